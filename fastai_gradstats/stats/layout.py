"""The plan: how one step's tensors are laid out for their reductions, built once per device and dtypes and kept.
Rows of one length (narrow ones padded up to a wider length, `_merge_narrow`) fill blocks of one reusable work buffer
(`_Chunk`), and every reduction has its slice of one result tensor (`_Layout`), laid out as `LayerStats.assemble`
reads it. Planning is the slow part, done once; each step then only copies and reduces (`reductions`)."""
from __future__ import annotations

import numpy as np
import torch

from .graphs import _StepGraph
from .histogram import HIST_BINS
from .metrics import METRICS, _ROWS, _tol_below
from .reductions import LONG_ROW, _buffer_dtype

__all__ = []


CHUNK_ELEMENTS = 2 ** 22
"Default size, in elements, of `LayerStats`' work buffer (16 MB in float32), the bulk of the extra memory it holds."


PAD_ELEMENTS = 2 ** 14
"""Most zeros `LayerStats` pads into one block to merge narrow rows with wider ones: each block costs a
fixed handful of calls, about as much as reducing a few times this many elements."""


def _merge_narrow(groups: dict, n_rows, limit: int) -> dict:
    """Regroup `{(row_length, dtype): tensor indices}` so that a row length joins the next wider one of its
    dtype (its rows padded with zeros up to that width) while the padding added, counted over all the rows
    carried up, stays at most `PAD_ELEMENTS` and the width at most `limit`. Returns `{(width, dtype): indices}`."""
    merged = {}
    for dtype in dict.fromkeys(d for _, d in groups):
        widths = sorted(length for length, d in groups if d == dtype)
        carried, padding = [], 0
        for k, width in enumerate(widths):
            members = carried + groups[(width, dtype)]
            if k + 1 < len(widths) and widths[k + 1] <= limit:
                more = padding + sum(n_rows(i) for i in members) * (widths[k + 1] - width)
                if more <= PAD_ELEMENTS:
                    carried, padding = members, more
                    continue
            merged[(width, dtype)] = members
            carried, padding = [], 0
    return merged


class _Chunk:
    """One pass of `LayerStats`' work: whole rows of tensors of one dtype, copied side by side into an
    (n_rows, row_length) block of the work buffer (`pieces`: (tensor, first_row, end_row)), shorter rows
    followed by zeros (`pad_targets`, rewritten by every copy), or (`direct`) one tensor whose rows are
    longer than the buffer, reduced where it lies."""
    def __init__(self, row_length, dtype, pieces, zero_tol, direct=False):
        self.row_length, self.dtype, self.pieces, self.direct = row_length, dtype, pieces, direct
        self.n_rows = sum(end - start for _, start, end in pieces)
        self.pad_targets, self.pad_sources = [], []
        self.tol = _tol_below(zero_tol, dtype)  # |g| <= tol in this dtype exactly when |g| <= zero_tol

    def pieces_of(self, tensors):
        "The pieces of `tensors` (gradients or parameters) this chunk holds, in the order of its rows."
        return [tensors[i] if part is None else tensors[i][part] for i, part in self.parts]

    def sources(self, tensors):
        "What one batched copy into the block reads: the pieces of `tensors`, then zeros for the padding."
        return self.pieces_of(tensors) + self.pad_sources

    def place(self, block, shapes, row_length):
        """Views of `block` (n_rows, self.row_length) where the pieces go, shaped like the (part of the) tensor each
        receives, and views of the padding after shorter rows: `(targets, pad_targets)`."""
        targets, pad_targets, row = [], [], 0
        for i, start, end in self.pieces:
            rows, length = block[row:row + end - start], row_length[i]
            targets.append(rows[:, :length].view((end - start,) + shapes[i][1:] if len(shapes[i]) >= 2 else shapes[i]))
            if length < self.row_length: pad_targets.append(rows[:, length:])
            row += end - start
        return targets, pad_targets


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _param_norms_by_rows(device: torch.device) -> bool:
    """How a layout on `device` takes the parameters' norms: along the rows of the work buffer, the parameters copied
    there like their gradients (True), or with one `torch._foreach_norm` over them (False). On CUDA that is one fused
    kernel, cheaper than a copy per tensor; on the CPU it runs one reduction per tensor, about 5 us each."""
    return device.type != 'cuda'


def _use_cuda_graphs() -> bool:
    "`fastai_gradstats.stats.USE_CUDA_GRAPHS` as it is now (a user sets it on the package, before training)."
    from . import USE_CUDA_GRAPHS
    return USE_CUDA_GRAPHS


class _Layout:
    """Where one step's results go: `collect` writes every reduction straight into its slice of one result
    tensor, kept from step to step (no concatenation), laid out as `LayerStats.assemble` reads it:
    per row of the blocks, 5 x `n_rows` (the gradient's L2 norms, the parameter's L2 norms, the gradient's
    sums, its elements <= zero_tol, its max |g|: `_ROWS`); the histogram counts (integers, stored in the
    result's bits); then room for `extra` values. When the parameters' norms are not taken along the rows
    (`_param_norms_by_rows`), each tensor's norm sits in its first row and its other rows hold 0."""

    def __init__(self, stats, chunks, device, dtypes, row_owner, starts, row_length, row_padding, hist_offset, samples):
        owner = row_owner[starts]  # the tensor of each run of rows (`starts`), in the order of the rows
        self.chunks, self.owner, self.starts, self.row_length, self.device = chunks, owner, starts, row_length, device
        self.hist_offset, self.samples = hist_offset, samples  # with `hist`: where counts go, the chunks' |g| samples
        n, n_rows = len(stats.shapes), len(row_length)
        # float64 gradients reduce in float64; everything else in float32
        self.dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self.hist_at = len(_ROWS) * n_rows
        self.extra_at = self.hist_at + (n * len(HIST_BINS) if stats.hist else 0)
        room = 1 + n if stats._extra_room is None else stats._extra_room  # for `extra`: a loss and a value per tensor
        self.result = torch.empty(self.extra_at + room, dtype=self.dtype, device=device)
        self.extra_slots = {}  # sizes of the `extra` tensors -> (their views of `result`, the result up to them)
        at = 0
        for c in chunks:
            slots = [self.result[k * n_rows + at:k * n_rows + at + c.n_rows] for k in range(len(_ROWS))]
            # a float32 chunk of a float64 result reduces into float32 staging slots, copied over after
            c.staged = None if c.dtype == self.dtype else slots
            c.out = slots if c.staged is None else [torch.zeros(c.n_rows, dtype=c.dtype, device=device) for _ in slots]
            at += c.n_rows
        self.param_rows = _param_norms_by_rows(device)
        # `collect(keep_params=True)` keeps the parameters laid out in rows, as they are copied for their norms anyway
        # (a copy of each chunk, zeros in its padding); else in one tensor per parameter (`kept_tensors`)
        self.keeps_rows = self.param_rows and not any(c.direct for c in chunks)
        # float32 and half-precision tensors whose update norm `update_norms` takes in pieces (on the CPU, see LONG_ROW)
        self.long_tensors = [i for i, (shape, dtype) in enumerate(zip(stats.shapes, dtypes))
                             if device.type == 'cpu' and dtype != torch.float64 and shape.numel() > LONG_ROW]
        self.kept, self.kept_tensors = False, None  # whether a copy is kept for `update_norms`; the per-tensor copies
        self.row_owner = row_owner  # the tensor of each row
        if not self.param_rows:  # each tensor's norm goes to its first row and its other rows stay 0 (see `assemble`)
            self.param_row_out = self.result[n_rows:2 * n_rows].zero_()
            self.first_rows = torch.as_tensor(starts, dtype=torch.long, device=device)
            self.owner_list = owner.tolist()
        self.hist_out = self.result[self.hist_at:self.extra_at].view(_INT_OF[self.dtype]) if stats.hist else None
        self.ones = torch.ones(1, dtype=_INT_OF[self.dtype], device=device)
        self.graph = _StepGraph() if device.type == 'cuda' and _use_cuda_graphs() else None
        # for `assemble`: per tensor in the order of `owner`, the constants that turn sums into values
        self.host_dtype = np.dtype(np.float64 if self.dtype == torch.float64 else np.float32)
        self.numel = numel = stats.numel[owner]
        self.padding = np.add.reduceat(row_padding, starts) if n_rows else np.zeros(0)
        # per row, the width of its unit's fan-in without padding; per tensor, its units (1-D tensors: None, see assemble)
        self.fan_in = row_length - row_padding
        self.units = np.diff(np.r_[starts, n_rows]).astype(np.float64)
        self.has_units = ~np.isnan(stats.n_units[owner])
        # elements <= zero_tol and dead units per tensor / this -> zero_frac, dead_frac
        self.fraction_of = np.stack([numel, stats.n_units[owner]])
        with np.errstate(divide='ignore'):
            self.inv_dof = np.where(numel > 1, 1 / (numel - 1), np.nan)
        # for `LayerStats._routine`, per row: its width (elements, padding included) and the bound its |sum| keeps
        # when its elements do not nearly all share one value (see there); a one-element tensor has no spread to lose
        self.row_width = row_length.astype(self.host_dtype)
        self.scratch = None  # `_assemble_steps`' float64 rows, kept for the next batch
        self.spread_bound = np.where(stats.numel[row_owner] > 1, np.sqrt(0.99 * (row_length - row_padding)), 2.0
                                     ).astype(self.host_dtype)
        self.empty_values = np.full((n, len(METRICS)), np.nan, np.float32)
        self.empty_values[:, :2] = 0  # an empty tensor (not in `owner`) has norms 0 and no other statistic


def _plan_layout(stats, device, dtypes, grads):
    "The layout of `stats` (a LayerStats) for gradients of these `dtypes` on `device`: its chunks, work buffers and result."
    elsewhere = sorted({str(g.device) for g in grads if g.device != device})
    if elsewhere:
        raise ValueError(f"`grads` lie on several devices ({device}, {', '.join(elsewhere)}): a LayerStats reduces "
                         "the gradients of one device; make one per device")
    budget, groups = stats.chunk_elements, {}
    for i, (shape, dtype) in enumerate(zip(stats.shapes, dtypes)):
        if shape.numel() == 0: continue
        groups.setdefault((stats.row_length[i], _buffer_dtype(dtype)), []).append(i)
    chunks = []
    for (length, dtype), members in _merge_narrow(groups, stats.rows.__getitem__, budget).items():
        if length > budget:  # rows longer than the buffer: reduce those tensors where they lie
            chunks += [_Chunk(length, dtype, [(i, 0, stats.rows[i])], stats.zero_tol, direct=True) for i in members]
            continue
        per_chunk, pieces, used = budget // length, [], 0
        for i in members:
            start = 0
            while start < stats.rows[i]:
                take = min(stats.rows[i] - start, per_chunk - used)
                pieces.append((i, start, start + take)); used += take; start += take
                if used == per_chunk: chunks.append(_Chunk(length, dtype, pieces, stats.zero_tol)); pieces, used = [], 0
        if pieces: chunks.append(_Chunk(length, dtype, pieces, stats.zero_tol))
    buffers = {}
    for c in chunks:  # rows too long for one float32 norm on the CPU (see LONG_ROW)
        c.long_rows = device.type == 'cpu' and c.dtype != torch.float64 and c.row_length > LONG_ROW
    for c in chunks:
        if not c.direct: buffers[c.dtype] = max(buffers.get(c.dtype, 0), c.n_rows * c.row_length)
    buffers = {dtype: torch.empty(size, dtype=dtype, device=device) for dtype, size in buffers.items()}
    stats._work_bytes[(device, dtypes)] = sum(b.numel() * b.element_size() for b in buffers.values())
    for c in chunks:
        if c.direct: continue
        c.block = buffers[c.dtype][:c.n_rows * c.row_length].view(c.n_rows, c.row_length)
        c.targets, c.pad_targets = c.place(c.block, stats.shapes, stats.row_length)
        # zeros after shorter rows: every copy rewrites them (the block is shared by the chunks)
        c.pad_sources = [torch.zeros(t.shape, dtype=c.dtype, device=device) for t in c.pad_targets]
        c.copy_targets = c.targets + c.pad_targets  # what one batched copy writes: the rows, then their padding
        c.parts = [(i, None if start == 0 and end == stats.rows[i] else slice(start, end)) for i, start, end in c.pieces]
    row_tensor = np.concatenate([np.repeat(i, end - start) for c in chunks for i, start, end in c.pieces]
                                or [np.zeros(0, np.int64)])
    starts = np.flatnonzero(np.r_[True, row_tensor[1:] != row_tensor[:-1]]) if len(row_tensor) else np.zeros(0, np.int64)
    row_length = np.concatenate([np.full(c.n_rows, c.row_length, np.float64) for c in chunks] or [np.zeros(0)])
    row_padding = np.concatenate([np.repeat(c.row_length - stats.row_length[i], end - start).astype(np.float64)
                                  for c in chunks for i, start, end in c.pieces] or [np.zeros(0)])
    hist_offset, samples = _plan_samples(stats, chunks, device) if stats.hist else (None, None)
    return _Layout(stats, chunks, device, dtypes, row_tensor, starts, row_length, row_padding, hist_offset, samples)


def _plan_samples(stats, chunks, device):
    """Where each tensor's histogram sample lies in the work buffer (or in the tensor, for direct chunks), and
    where each chunk's |g| samples go: `(owner offsets, the float32 buffer the chunks' `sample_out` views share)`."""
    index = stats.histogram.index
    for c in chunks:
        picks, owners, row = [], [], 0
        for i, start, end in c.pieces:
            length = stats.row_length[i]
            n_piece, lo = (end - start) * length, start * length
            wanted = torch.arange(lo, lo + n_piece) if index[i] is None else index[i][(index[i] >= lo) & (index[i] < lo + n_piece)]
            at = wanted - lo  # in the block, rows are c.row_length apart (padded after `length`)
            picks.append((row + at // length) * c.row_length + at % length); owners.append(torch.full((len(wanted),), i))
            row += end - start
        c.sample_index = torch.cat(picks).to(device)
        c.sample_owner = torch.cat(owners)
    owner = torch.cat([c.sample_owner for c in chunks] or [torch.zeros(0, dtype=torch.long)])
    samples, at = torch.empty(len(owner), dtype=torch.float32, device=device), 0
    for c in chunks:  # the histogram reads float32 bits: float64 samples are rounded as they are stored
        c.sample_out = samples[at:at + len(c.sample_owner)]
        at += len(c.sample_owner)
    return (owner * len(HIST_BINS)).to(device), samples
