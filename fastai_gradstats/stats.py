"""Per-tensor gradient statistics, computed in batched form with plain torch.

Nothing here knows fastai or pandas. Given the gradients and parameters of a model,
`LayerStats.collect` leaves one step's reductions in one tensor on the gradients' device,
and `LayerStats.assemble` turns its host copy into one row of `METRICS` per tensor. The work
is a handful of batched `torch._foreach_*` calls and reductions over blocks of rows that
never leave the device: no `.item()` and no host copy per tensor or per metric. The caller
decides when to move the one result tensor to the host.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np
import torch

from .checks import _check_shapes, _check_tensors, _is_int, _positive_int, check_zero_tol

__all__ = ['METRICS', 'LayerStats', 'count_nonfinite', 'check_zero_tol', 'HIST_BINS', 'HIST_DECADES', 'MagnitudeHistogram']

METRICS = ('grad_norm', 'param_norm', 'grad_max', 'grad_mean', 'grad_std',
           'zero_frac', 'dead_frac', 'shared_zero_frac', 'unit_spread')
"Columns of the tensor `LayerStats` returns, in order."

# a float32 norm below this may have lost squares to underflow (elements under about 1e-22 lose precision, under
# about 2.6e-23 vanish): `LayerStats.refine` redoes gradients and parameters below it, `_exact_norms` updates;
# one above HUGE_NORM may have overflowed (a float32 sum of squares ends at about 3.4e38: norms at about 1.8e19)
TINY_NORM, HUGE_NORM = 1e-18, 1e19


def _tol_below(tol: float, dtype: torch.dtype) -> float:
    "The largest value of `dtype` that is <= `tol`: |g| <= it exactly when |g| <= `tol` (no rounding up of `tol`)."
    t = torch.tensor(tol, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)) if float(t) > tol else t)


CHUNK_ELEMENTS = 2 ** 22
"Default size, in elements, of `LayerStats`' work buffer (16 MB in float32), the bulk of the extra memory it holds."


def _rows(shape: torch.Size) -> int:
    "Units of a tensor: its rows along dim 0 when it has 2+ dims (neurons, channels), else one row."
    return shape[0] if len(shape) >= 2 and shape[0] > 0 else 1


def _buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    "Half-precision gradients are reduced in float32; float64 ones in float64."
    return torch.float64 if dtype == torch.float64 else torch.float32


LONG_ROW = 2 ** 16
"""Longest row whose float32 L2 norm the CPU takes in one piece. Torch adds a row's float32 squares one after another,
which drifts by about 1e-5 (relative) over a million elements and 1e-3 over 16 million (2e-7 over this many): on the
CPU, float32 and half-precision rows longer than this are reduced in pieces of this length, their squares added in
float64 (`_long_row_norms`). Sums keep their accuracy (torch adds them pairwise)."""


def _long_row_norms(rows: torch.Tensor, **kwargs) -> torch.Tensor:
    "L2 norms along dim 1 of 2-D `rows` longer than `LONG_ROW` (float64): in pieces of `LONG_ROW`, their squares added in float64."
    whole = rows.shape[1] // LONG_ROW * LONG_ROW
    squares = torch.linalg.vector_norm(rows[:, :whole].unflatten(1, (-1, LONG_ROW)), dim=2, **kwargs).double().square().sum(1)
    if whole < rows.shape[1]: squares += torch.linalg.vector_norm(rows[:, whole:], dim=1, **kwargs).double().square()
    return squares.sqrt()


def _row_norms_into(out: torch.Tensor, rows: torch.Tensor, long_rows: bool):
    "L2 norms along dim 1 of 2-D `rows` into `out`: in one piece, or (`long_rows`) by `_long_row_norms`."
    if long_rows: out.copy_(_long_row_norms(rows))
    else: torch.linalg.vector_norm(rows, dim=1, out=out)


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
_ROWS = ('grad_norm', 'param_norm', 'sum', 'zeros', 'max')
"What `LayerStats` reduces each row of a block (a unit of a tensor) to, in the order of its result."


def _param_norms_by_rows(device: torch.device) -> bool:
    """How a layout on `device` takes the parameters' norms: along the rows of the work buffer, the parameters copied
    there like their gradients (True), or with one `torch._foreach_norm` over them (False). On CUDA that is one fused
    kernel, cheaper than a copy per tensor; on the CPU it runs one reduction per tensor, about 5 us each."""
    return device.type != 'cuda'


USE_CUDA_GRAPHS = True
"""On a CUDA device, replay each step's reductions as one CUDA graph (see `_StepGraph`); read when a layout is planned.
Set it to False before training to launch them one by one."""


class _StepGraph:
    """A layout's reductions (`LayerStats._reduce`) captured as one CUDA graph and replayed: one launch per step
    instead of about 60, which on a GPU cost more host time than all the rest of a recorded step.

    A graph reads the memory its gradients and parameters had when it was captured. So it is captured only once
    their addresses stayed the same for two steps in a row (fastai zeroes gradients in place; an optimizer that sets
    them to None may reallocate them elsewhere), replayed only while they stay there, and dropped when they move.
    Their shapes and dtypes are the layout's, and their strides stay too: a gradient is laid out like its
    parameter, and a parameter laid out anew lies at a new address.

    After `MAX_CAPTURES` captures, or one that fails, the layout launches its reductions one by one (what it did
    before); it does not capture while another CUDA graph is being captured. The fallback after a failed capture is
    a safety net, not a guarantee: a capture that CUDA itself invalidates can leave torch's allocator in a degraded
    state, which is why it is never retried (no capture failed in the tests on an H200 with CUDA 13 and torch 2.11).
    A graph keeps the temporaries of `_reduce` in its own memory pool: small next to the work buffer, except for
    tensors whose rows exceed it (reduced where they lie, with |g| temporaries)."""
    MAX_CAPTURES = 3

    def __init__(self):
        self.graph, self.addresses, self.last, self.stable, self.captures, self.failed = None, None, None, 0, 0, False

    def run(self, stats, layout, grads, params) -> bool:
        "Do this step's reductions as a graph: True if done, False if the caller must launch them itself."
        addresses = (*map(_DATA_PTR, grads), *map(_DATA_PTR, params))
        if self.graph is not None:
            if addresses == self.addresses:
                self.graph.replay()
                return True
            self.graph = None  # the tensors moved: wait for them to settle again
        self.stable = self.stable + 1 if addresses == self.last else 0
        self.last = addresses
        if self.stable < 2 or self.failed or self.captures >= self.MAX_CAPTURES: return False
        graph = self._record(stats, layout, grads, params)
        if graph is None: return False
        graph.replay()  # capturing records the work without doing it
        self.graph, self.addresses = graph, addresses
        return True

    def _record(self, stats, layout, grads, params):
        "A CUDA graph of `stats._reduce` on these tensors; None while another capture is under way, or if it fails."
        if torch.cuda.is_current_stream_capturing(): return None
        self.captures += 1
        graph, stream, current = torch.cuda.CUDAGraph(), torch.cuda.Stream(layout.device), torch.cuda.current_stream(layout.device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                stats._reduce(layout, grads, params)  # a warm-up on the capturing stream, as CUDA graphs ask
                # thread_local: other threads (a DataLoader's pinning thread) may use CUDA meanwhile
                graph.capture_begin(capture_error_mode='thread_local')
                try: stats._reduce(layout, grads, params)
                finally: graph.capture_end()
        except Exception:  # an op that cannot be captured: launch one by one from now on
            self.failed = True
            return None
        finally:
            current.wait_stream(stream)
        return graph


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
        self.graph = _StepGraph() if device.type == 'cuda' and USE_CUDA_GRAPHS else None
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


def _drop_kept(layout):
    "Free what `LayerStats.collect(keep_params=True)` kept in `layout`."
    layout.kept, layout.kept_tensors = False, None
    for c in layout.chunks: c.kept = c.kept_targets = None


class LayerStats:
    """Batched statistics of a fixed list of gradient tensors and their parameters.

    Build it once for a list of shapes, then call it every step with the current gradients and
    parameters. Statistics per tensor (the columns of `METRICS`):

    - `grad_norm`: L2 norm of the gradient; `param_norm`: L2 norm of the parameter;
    - `grad_max`: largest |g|; `grad_mean`, `grad_std`: mean and standard deviation of the
      gradient's elements (`grad_std` with Bessel's correction, as `torch.std`; NaN for one element);
    - `zero_frac`: fraction of elements with |g| <= `zero_tol`;
    - `dead_frac`: fraction of units (slices along dim 0 of a tensor with 2+ dims: output
      neurons or channels) whose whole gradient is <= `zero_tol`; NaN for 0-D and 1-D tensors;
    - `shared_zero_frac`: the smallest fraction of zeros (|g| <= `zero_tol`) in the row of a live unit (one that is
      not dead): at most this share of the fan-in gets no gradient in every live unit: inputs that are zero, units
      upstream that are off, kernel positions that lie outside a small feature map. NaN without units, or with no
      live unit;
    - `unit_spread`: how much the units' gradients differ: sqrt(var(norms) + var(sums / sqrt(fan-in))) / mean(norm),
      the variances over the units of their rows' L2 norms and sums: 0 when every unit gets the same gradient, as
      symmetric units do (weights initialised to one constant); not for units whose gradients are each other's
      negatives (the two outputs of a softmax). NaN for 0-D and 1-D tensors, one unit, or no gradient at all.
    An empty tensor has norms 0 and NaN for every other statistic.
    With `hist=True` it also counts each gradient's log10 |g| histogram, as `MagnitudeHistogram` does, on at most
    `hist_sample` fixed, evenly spread elements of each tensor (None: all of them).

    How it is fast: the gradients' rows are copied, grouped by row length, into one reusable work
    buffer of at most `chunk_elements` elements (one batched copy per block); narrow rows join a
    wider group, followed by zeros, when that pads at most `PAD_ELEMENTS` (a block costs a fixed
    handful of calls; the padding is subtracted from the zero counts). Each block then takes
    four reductions along its rows, whatever the number of tensors in it: sum and L2 norm; max after
    an in-place |g|; and, after an in-place `<= zero_tol`, a sum that counts the zero elements (a
    unit is dead when all of its row is). The parameters, laid out like their gradients, are then
    copied into the same block and take one L2 norm along its rows (on CUDA, where it is one fused
    kernel, `torch._foreach_norm` gives their norms instead). That replaces several small
    reductions per tensor. Every reduction writes straight into its place in one result tensor that
    the object keeps on the gradients' device (no concatenation at the end), with the
    caller's `extra` values: the caller copies it to the host once, and `assemble` turns it into
    one row per tensor with numpy. No `.item()`, no copy per tensor or per metric. On a CUDA device the
    reductions of a step are replayed as one CUDA graph once the tensors stay where they are (`_StepGraph`,
    `USE_CUDA_GRAPHS`). The gradients must lie on one device (`ValueError` otherwise): make one per device.
    `collect(..., keep_params=True)` also keeps the parameters (on the CPU the copy above, unless a tensor's rows exceed
    the buffer: nothing more to copy), and `update_norms` then says how far the optimizer step moved each one.
    Sums accumulate in float32 (float64 for float64 gradients); `refine` redoes in float64 the rare
    rows where that is not enough (overflow, NaN/Inf, cancellation in the std). NaN and Inf
    propagate into the norms, the max, the mean and the std as they are; `refine` counts them.
    """
    _extra_room = None  # values of `extra` a layout's result keeps room for (None: 1 + len(shapes)); set before the first collect

    def __init__(self, shapes: Sequence[torch.Size], zero_tol: float = 0.0, hist: bool = False,
                 hist_sample: int | None = 2048, chunk_elements: int = CHUNK_ELEMENTS):
        self.zero_tol = check_zero_tol(zero_tol)
        if not isinstance(hist, bool): raise TypeError(f"`hist` must be True or False, got {hist!r}")
        chunk_elements = _positive_int(chunk_elements, 'chunk_elements')
        hist_sample = _positive_int(hist_sample, 'hist_sample', allow_none=True)
        self.shapes = _check_shapes(shapes)
        self.hist, self.chunk_elements = hist, chunk_elements
        self.histogram = MagnitudeHistogram(self.shapes, self.zero_tol, hist_sample) if hist else None
        self.numel = np.array([s.numel() for s in self.shapes], np.float64)
        self.rows = [_rows(s) for s in self.shapes]
        self.row_length = [s.numel() // r for s, r in zip(self.shapes, self.rows)]
        self.n_units = np.array([s[0] if len(s) >= 2 else math.nan for s in self.shapes], np.float64)
        # `refine`'s cancellation test as std < grad_norm * this (0: never for one element, whose std is NaN)
        self._cancel_scale = np.sqrt(1e-3 / np.maximum(self.numel - 1, 1)) * (self.numel > 1)
        self._nonempty = _nonempty(self.numel)
        self._layouts, self._last, self._work_bytes = {}, None, {}

    def __len__(self): return len(self.shapes)

    def __getstate__(self):
        """Pickled without its layouts (a GradStats saved by `learn.export` after an interrupted fit holds its plan): their
        buffers are scratch space, a CUDA graph cannot be pickled, plain `pickle` would copy each view of a buffer apart
        from it, and a kept copy of the parameters is as large as they are. The next `collect` plans again."""
        return {**self.__dict__, '_layouts': {}, '_last': None, '_work_bytes': {}}

    def __setstate__(self, state):
        "As `__getstate__`; an object pickled by an older version may hold layouts, which read their result differently: dropped."
        self.__dict__.update(state)
        self._layouts, self._last, self._work_bytes = {}, None, {}
        if '_nonempty' not in state:  # pickled before it existed
            self._nonempty = _nonempty(self.numel)

    @property
    def work_bytes(self) -> int:
        """Bytes of work buffer this object holds (at most `chunk_elements` elements per gradient dtype seen; besides it,
        a result of a few values per row and the zeros that pad narrow rows, at most `PAD_ELEMENTS` per block)."""
        return sum(self._work_bytes.values())

    # --- the plan ---------------------------------------------------------------------------------
    def _layout(self, grads):
        "The chunks for these gradients' dtypes and device, built once and kept (with the work buffers)."
        key = (grads[0].device, tuple(map(_DTYPE, grads)))
        if key not in self._layouts: self._layouts[key] = self._plan(grads[0].device, key[1], grads)
        self._last = self._layouts[key]
        return self._last

    def _plan(self, device, dtypes, grads):
        elsewhere = sorted({str(g.device) for g in grads if g.device != device})
        if elsewhere:
            raise ValueError(f"`grads` lie on several devices ({device}, {', '.join(elsewhere)}): a LayerStats reduces "
                             "the gradients of one device; make one per device")
        budget, groups = self.chunk_elements, {}
        for i, (shape, dtype) in enumerate(zip(self.shapes, dtypes)):
            if shape.numel() == 0: continue
            groups.setdefault((self.row_length[i], _buffer_dtype(dtype)), []).append(i)
        chunks = []
        for (length, dtype), members in _merge_narrow(groups, self.rows.__getitem__, budget).items():
            if length > budget:  # rows longer than the buffer: reduce those tensors where they lie
                chunks += [_Chunk(length, dtype, [(i, 0, self.rows[i])], self.zero_tol, direct=True) for i in members]
                continue
            per_chunk, pieces, used = budget // length, [], 0
            for i in members:
                start = 0
                while start < self.rows[i]:
                    take = min(self.rows[i] - start, per_chunk - used)
                    pieces.append((i, start, start + take)); used += take; start += take
                    if used == per_chunk: chunks.append(_Chunk(length, dtype, pieces, self.zero_tol)); pieces, used = [], 0
            if pieces: chunks.append(_Chunk(length, dtype, pieces, self.zero_tol))
        buffers = {}
        for c in chunks:  # rows too long for one float32 norm on the CPU (see LONG_ROW)
            c.long_rows = device.type == 'cpu' and c.dtype != torch.float64 and c.row_length > LONG_ROW
        for c in chunks:
            if not c.direct: buffers[c.dtype] = max(buffers.get(c.dtype, 0), c.n_rows * c.row_length)
        buffers = {dtype: torch.empty(size, dtype=dtype, device=device) for dtype, size in buffers.items()}
        self._work_bytes[(device, dtypes)] = sum(b.numel() * b.element_size() for b in buffers.values())
        for c in chunks:
            if c.direct: continue
            c.block = buffers[c.dtype][:c.n_rows * c.row_length].view(c.n_rows, c.row_length)
            c.targets, c.pad_targets = c.place(c.block, self.shapes, self.row_length)
            # zeros after shorter rows: every copy rewrites them (the block is shared by the chunks)
            c.pad_sources = [torch.zeros(t.shape, dtype=c.dtype, device=device) for t in c.pad_targets]
            c.copy_targets = c.targets + c.pad_targets  # what one batched copy writes: the rows, then their padding
            c.parts = [(i, None if start == 0 and end == self.rows[i] else slice(start, end)) for i, start, end in c.pieces]
        row_tensor = np.concatenate([np.repeat(i, end - start) for c in chunks for i, start, end in c.pieces]
                                    or [np.zeros(0, np.int64)])
        starts = np.flatnonzero(np.r_[True, row_tensor[1:] != row_tensor[:-1]]) if len(row_tensor) else np.zeros(0, np.int64)
        row_length = np.concatenate([np.full(c.n_rows, c.row_length, np.float64) for c in chunks] or [np.zeros(0)])
        row_padding = np.concatenate([np.repeat(c.row_length - self.row_length[i], end - start).astype(np.float64)
                                      for c in chunks for i, start, end in c.pieces] or [np.zeros(0)])
        hist_offset, samples = self._plan_samples(chunks, device) if self.hist else (None, None)
        return _Layout(self, chunks, device, dtypes, row_tensor, starts, row_length, row_padding, hist_offset, samples)

    def _plan_samples(self, chunks, device):
        """Where each tensor's histogram sample lies in the work buffer (or in the tensor, for direct chunks), and
        where each chunk's |g| samples go: `(owner offsets, the float32 buffer the chunks' `sample_out` views share)`."""
        index = self.histogram.index
        for c in chunks:
            picks, owners, row = [], [], 0
            for i, start, end in c.pieces:
                length = self.row_length[i]
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

    # --- every step --------------------------------------------------------------------------------
    def _check(self, grads, params):
        _check_tensors(grads, 'grads'); _check_tensors(params, 'params')
        if len(grads) != len(self.shapes) or len(params) != len(self.shapes):
            raise ValueError(f"`grads` and `params` must hold {len(self.shapes)} tensors each (the planned shapes), "
                             f"got {len(grads)} and {len(params)}")
        for i, (g, p, s) in enumerate(zip(grads, params, self.shapes)):
            if g.shape != s: raise ValueError(f"`grads[{i}]` has shape {tuple(g.shape)} where {tuple(s)} was planned")
            if p.shape != s: raise ValueError(f"`params` must have their gradients' shapes: got {tuple(p.shape)} for {tuple(s)}")

    def collect(self, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], extra=None,
                keep_params: bool = False) -> torch.Tensor:
        """The raw reductions of one step as one flat tensor on the gradients' device, followed by the values of
        `extra` (a tensor, or a list of tensors, flattened): copy it to the host once and pass it to `assemble`.
        The tensor is float32 (float64 when a gradient is, or when there are no gradients), so `extra` values
        are rounded to that precision, and it is reused: the next `collect` overwrites it, so copy it (`.cpu()`
        from a GPU, `.clone()` on the CPU) to keep it, and do not pass a view of it as `extra`. Reads `grads`
        and `params` without changing them. With `keep_params=True` it also keeps a copy of `params` (as large as
        theirs, in float32 for half precision; reused from step to step) for `update_norms` to measure how far they move next."""
        self._check(grads, params)
        if not isinstance(keep_params, bool): raise TypeError(f"`keep_params` must be True or False, got {keep_params!r}")
        extra = [] if extra is None else [extra] if isinstance(extra, torch.Tensor) else list(extra)
        _check_tensors(extra, 'extra')
        return self._collect(grads, params, extra, keep_params)

    def update_norms(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """How far each parameter moved since the last `collect(..., keep_params=True)`: the L2 norm of its value then
        minus its value now, one per tensor, as a float tensor of shape `(len(params),)` on their device (no host copy;
        pass it to the next `collect` as `extra` to bring it along). Uses up the kept copy: a second call without a
        `collect` that keeps one in between is a ValueError. On the CPU it reuses the copy `collect` makes of the
        parameters for their norms, laid out in rows: one subtraction per chunk and one norm along its rows. On the CPU the
        result is float64, and norms of float32 (or half-precision) parameters below `TINY_NORM` or above `HUGE_NORM`
        are taken again in float64, as `refine` takes the gradients': an update whose elements are below about 1e-22
        would lose its squares to float32 underflow, one above about 1e19 would overflow. On CUDA they stay float32
        (a look at them would make the host wait)."""
        _check_tensors(params, 'params')
        if len(params) != len(self.shapes) or list(map(_SHAPE, params)) != self.shapes:
            raise ValueError(f"`params` must be the {len(self.shapes)} tensors of the planned shapes, as given to `collect`")
        if not self.shapes: return torch.zeros(0)  # nothing to move
        if self._last is None or not self._last.kept:
            raise ValueError("`update_norms` needs a `collect(..., keep_params=True)` of these parameters' dtypes first, "
                             "and none since the last `update_norms`")
        return self._update_norms(params)

    def _update_norms(self, params):
        "`update_norms` for a caller that passes the list of parameters it gave to `_collect(keep=True)` (not checked)."
        layout = self._last
        layout.kept = False
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            on_cpu = layout.device.type == 'cpu'  # where a look at the norms costs no wait for the device
            if not layout.keeps_rows:
                torch._foreach_sub_(layout.kept_tensors, params)  # in place: the copies now hold before - after
                norms = torch.stack(_norms(layout.kept_tensors))
                if not on_cpu: return norms
                norms = norms.to(torch.float64)
                for i in layout.long_tensors:  # a float32 norm of more than LONG_ROW elements drifts: in pieces
                    norms[i] = _long_row_norms(layout.kept_tensors[i].reshape(1, -1))[0]
                if not _within_float32_range(norms.numpy()[self._nonempty]): _exact_norms(norms, layout.kept_tensors)
                return norms
            for c in layout.chunks:
                torch._foreach_sub_(c.kept_targets, c.pieces_of(params))
                _row_norms_into(c.update_rows, c.kept, c.long_rows)
                if c.update_staged is not None: c.update_staged.copy_(c.update_rows)
            norms = _sum_row_norms(layout)
            if on_cpu and not _within_float32_range(norms.numpy()[self._nonempty]):
                _exact_row_norms(layout)
                norms = _sum_row_norms(layout)
            return norms
        finally:
            torch.set_grad_enabled(grad_mode)

    def _keep(self, layout, params):
        """Make room for `collect(keep_params=True)`'s copy (once per layout; the per-tensor copies again if `params`
        changed), and free the copies other layouts of this object kept (left behind by a change of dtype)."""
        for other in self._layouts.values():
            if other is not layout: _drop_kept(other)
        if layout.keeps_rows:
            for c in layout.chunks:
                if getattr(c, 'kept', None) is None:
                    c.kept = torch.zeros(c.n_rows, c.row_length, dtype=c.dtype, device=layout.device)
                    c.kept_targets, _ = c.place(c.kept, self.shapes, self.row_length)
            if getattr(layout, 'row_owner_index', None) is None:
                layout.row_owner_index = torch.as_tensor(layout.row_owner, dtype=torch.long, device=layout.device)
                # the rows' update norms side by side in float64 (a float32 chunk's staged: one copy)
                layout.update_rows = torch.empty(len(layout.row_owner), dtype=torch.float64, device=layout.device)
                layout.update_sums = torch.empty(len(self.shapes), dtype=torch.float64, device=layout.device)
                at = 0
                for c in layout.chunks:
                    rows = layout.update_rows[at:at + c.n_rows]
                    c.update_rows, c.update_staged = (rows, None) if c.dtype == torch.float64 else (torch.empty_like(rows, dtype=c.dtype), rows)
                    at += c.n_rows
            return
        kept = layout.kept_tensors
        # half precision kept in float32, as in the rows: their difference then rounds to float32, not to half precision
        if kept is None or any(b.shape != p.shape or b.dtype != _buffer_dtype(p.dtype) or b.device != p.device for b, p in zip(kept, params)):
            layout.kept_tensors = [torch.empty_like(p, dtype=_buffer_dtype(p.dtype), requires_grad=False) for p in params]

    def _collect(self, grads, params, extra, keep=False):
        """`collect` for a caller that passes lists of tensors, `params` as many as `grads`, and `extra` a list:
        only the gradients' shapes are checked (the full check runs when they differ from the plan's, to say how).
        The layout is looked up by the gradients' dtypes and device on every call: the same tensor objects can
        change both (`Module.double()`, `.to(device)` swap their `.data`)."""
        if not grads:
            flat = [e.detach().reshape(-1).to(torch.float64) for e in extra]
            return torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
        if list(map(_SHAPE, grads)) != self.shapes: self._check(grads, params)
        layout = self._layout(grads)
        if keep: self._keep(layout, params)
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # the parameters require grad: read them without recording (cheaper than `with no_grad`)
        try:
            if keep and layout.keeps_rows: self._reduce(layout, grads, params, keep=True)
            elif layout.graph is None or not layout.graph.run(self, layout, grads, params): self._reduce(layout, grads, params)
            if keep and not layout.keeps_rows: torch._foreach_copy_(layout.kept_tensors, params)
            if keep: layout.kept = True  # a collect that does not keep leaves the copy where it is
            return self._write_extra(layout, extra)
        finally:
            torch.set_grad_enabled(grad_mode)

    def _reduce(self, layout, grads, params, keep=False):
        """Every reduction of one step, launched one by one, into `layout.result` (what a CUDA graph of the layout replays);
        `keep`: the parameters' rows go to the chunks' kept copies (`layout.keeps_rows`) rather than the work buffer."""
        by_rows = params if layout.param_rows else None
        for c in layout.chunks:
            if c.direct: self._reduce_direct(c, grads, by_rows)
            else: self._reduce_block(c, grads, by_rows, keep)
            if c.staged is not None: torch._foreach_copy_(c.staged, c.out)
        if not layout.param_rows and layout.owner_list:
            norms = torch.stack(_norms([params[i] for i in layout.owner_list]))
            layout.param_row_out.index_copy_(0, layout.first_rows, norms.to(layout.dtype))
        if self.hist:  # the chunks left every tensor's |g| sample in `layout.samples`
            _bin_counts(layout.samples, layout.hist_offset, len(grads), self.histogram.tol_bits,
                        out=layout.hist_out, ones=layout.ones, nonnegative=True)

    def _write_extra(self, layout, extra):
        "`extra`'s values after the results: in the room the result keeps for them when they fit, else appended."
        sizes = tuple(e.numel() for e in extra)
        slots = layout.extra_slots.get(sizes)
        if slots is None:
            if sum(sizes) > len(layout.result) - layout.extra_at:
                flat = [e.detach().reshape(-1).to(layout.result) for e in extra]
                return torch.cat([layout.result[:layout.extra_at]] + flat)
            at, slots = layout.extra_at, []
            for size in sizes: slots.append(layout.result[at:at + size]); at += size
            slots = layout.extra_slots[sizes] = (slots, layout.result[:at])
        for slot, e in zip(slots[0], extra): slot.copy_(e if e.dim() == 1 else e.reshape(-1))
        return slots[1]

    def _reduce_block(self, c, grads, params, keep=False):
        """A block's rows of gradients, then of parameters (laid out alike; unless `params` is None), copied into the work
        buffer (the parameters into the chunk's kept copy with `keep`) and reduced."""
        torch._foreach_copy_(c.copy_targets, c.sources(grads))
        block = c.block  # our own copy: free to overwrite in place
        norm, param_norm, total, zeros, high = c.out
        torch.sum(block, 1, out=total); _row_norms_into(norm, block, c.long_rows)
        torch.amax(block.abs_(), 1, out=high)
        if self.hist:  # `take`, not `index_select`: on the CPU it runs on every thread (a serial op lets idle threads sleep, and waking them costs more)
            if c.dtype == torch.float32: torch.take(block, c.sample_index, out=c.sample_out)
            else: c.sample_out.copy_(_float32_magnitudes(torch.take(block, c.sample_index), self.zero_tol))
        torch.sum(block.le_(c.tol), 1, out=zeros)
        if params is None: return
        # the parameters' rows in the same places (one batched read, and one reduction whatever the number of tensors)
        if keep:  # into the chunk's own copy, kept for `update_norms` (its padding stays zero)
            torch._foreach_copy_(c.kept_targets, c.pieces_of(params))
            block = c.kept
        else: torch._foreach_copy_(c.copy_targets, c.sources(params))
        _row_norms_into(param_norm, block, c.long_rows)

    def _reduce_direct(self, c, grads, params):
        (i, _, _), = c.pieces
        g = grads[i]
        rows = g.reshape(self.rows[i], -1)
        wide = dict(dtype=torch.float32) if g.dtype not in _WIDE else {}
        norm, param_norm, total, zeros, high = c.out
        row_norms = _long_row_norms if c.long_rows else lambda x, **kw: torch.linalg.vector_norm(x, dim=1, **kw)
        total.copy_(rows.sum(1, **wide)); norm.copy_(row_norms(rows, **wide))
        if params is not None:
            p = params[i]
            param_norm.copy_(row_norms(p.reshape(self.rows[i], -1), **({'dtype': torch.float32} if p.dtype not in _WIDE else {})))
        high.copy_(torch.maximum(rows.amax(1), rows.amin(1).neg()))
        if self.zero_tol == 0: zeros.copy_(c.row_length - torch.count_nonzero(rows, dim=1))
        else: zeros.copy_((rows.abs() <= _tol_below(self.zero_tol, g.dtype)).sum(1))
        if self.hist:
            picked = g.reshape(-1).index_select(0, c.sample_index)
            if picked.dtype == torch.float64: c.sample_out.copy_(_float32_magnitudes(picked, self.zero_tol))
            else: c.sample_out.copy_(picked).abs_()

    def assemble(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Turn a host copy of `collect`'s result into `(values, hist)`: `values` float32 of shape
        `(len(self), len(METRICS))`, `hist` int64 of shape `(len(self), len(HIST_BINS))` (None without `hist`).
        Values of `extra` after them are ignored. Reads the layout of the last `collect`."""
        n = len(self.shapes)
        if not n: return np.zeros((0, len(METRICS)), np.float32), (np.zeros((0, len(HIST_BINS)), np.int64) if self.hist else None)
        if self._last is None: raise ValueError("`assemble` needs a `collect` of this object first")
        layout = self._last
        raw = np.asarray(raw)
        if raw.dtype != layout.host_dtype:
            raise TypeError(f"`raw` must be the {layout.host_dtype} array `collect` returned, got {raw.dtype}")
        if raw.ndim != 1 or len(raw) < layout.extra_at:
            raise ValueError(f"`raw` must be 1-D with at least {layout.extra_at} values, as `collect` returns, got shape {raw.shape}")
        values, hist = self._assemble_steps(raw[None], layout)
        return values[0], None if hist is None else hist[0]

    def _assemble_steps(self, raws: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray | None]:
        """`assemble` for several steps at once: `raws` (steps, at least `layout.extra_at`), each a host copy of a
        `collect` result laid out by `layout`, gives `values` (steps, len(self), len(METRICS)) and `hist` (steps,
        len(self), len(HIST_BINS)) or None. Not checked. The same few numpy calls whatever the number of steps:
        between two training steps every call runs with cold caches (several us each), so `GradStats` assembles
        the steps it records in batches."""
        k, n, n_rows = len(raws), len(self.shapes), len(layout.row_length)
        # per row (`_ROWS`): gradient and parameter L2 norms, sum, elements <= zero_tol (padding included), max |g|;
        # in float64, in scratch kept by the layout (a new array of this size each time faulted its pages in anew)
        if layout.scratch is None or len(layout.scratch) < k: layout.scratch = np.empty((k, len(_ROWS), n_rows))
        rows = layout.scratch[:k]
        rows[:] = raws[:, :len(_ROWS) * n_rows].reshape(k, len(_ROWS), n_rows)
        np.square(rows[:, :2], out=rows[:, :2])
        out = np.empty((k, len(METRICS), len(layout.owner)))
        if n_rows:
            with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
                # out holds the columns of METRICS: grad_norm, param_norm, grad_max, grad_mean, grad_std, zero_frac, dead_frac,
                # shared_zero_frac, unit_spread
                np.maximum.reduceat(rows[:, 4], layout.starts, axis=1, out=out[:, 2])
                np.equal(rows[:, 3], layout.row_length, out=rows[:, 4])  # dead: every element (padding included) <= zero_tol
                # per tensor: gradient and parameter sums of squares, sum, zeros, dead units
                sums = np.add.reduceat(rows, layout.starts, axis=2)
                sums[:, 3] -= layout.padding  # zeros counted in the padding (exact integers: a tensor without zeros reads 0)
                np.sqrt(sums[:, :2], out=out[:, :2])
                np.divide(sums[:, 2], layout.numel, out=out[:, 3])
                np.divide(sums[:, 3:], layout.fraction_of, out=out[:, 5:7])
                _unit_columns(rows, sums[:, 0], layout, out)
                # std with Bessel's correction from the sums: (sum of squares - sum * mean) / (numel - 1), NaN for one element
                spread = out[:, 4]
                np.multiply(sums[:, 2], out[:, 3], out=spread); np.subtract(sums[:, 0], spread, out=spread)
                np.maximum(spread, 0, out=spread); spread *= layout.inv_dof; np.sqrt(spread, out=spread)
        values = np.empty((k, n, len(METRICS)), np.float32)
        values[:] = layout.empty_values
        values[:, layout.owner] = out.transpose(0, 2, 1)
        hist = None
        if self.hist:
            hist = raws[:, layout.hist_at:layout.extra_at].view(np.int64 if raws.dtype == np.float64 else np.int32)
            hist = hist.astype(np.int64).reshape(k, n, len(HIST_BINS))
        return values, hist

    def _routine(self, raw: np.ndarray, layout, total_limit: float) -> bool:
        """Whether the step whose host copy (of a `collect` laid out by `layout`) is `raw` is routine: `refine` would
        find nothing to fix in it, and the sum of its gradients' squared norms stays below `total_limit`. A few
        numpy calls over its rows, no per-tensor sums; True only when sure, so a False may be a false alarm.

        - the sum of squares, a float32 dot product over the rows, stays below `total_limit` with room for its
          rounding (at most n_rows * 2**-24 of it) and for that of the per-tensor norms the caller would add up;
        - every norm is finite (no NaN or Inf element, no float32 overflow) and their squares add up below float32's
          largest value, so no tensor's norm overflows either: two dot products;
        - no std is lost to cancellation: by Cauchy-Schwarz a tensor's (sum)^2 / numel is at most the sum over its
          rows of (row sum)^2 / (row length); so when every row keeps |row sum| <= sqrt(0.99 * length) * row norm,
          its (sum)^2 / numel stays within 0.99 of its sum of squares, far from `refine`'s 0.999. A row whose elements
          nearly all share one value (or that holds one element) proves nothing: then each tensor's sums are taken
          as `assemble` takes them (`_spread_safe`);
        - no norm underflows: a tensor `refine` would redo has such a row: for a gradient (norm < 1e-18 with some
          element above zero_tol) a row with a norm below 1e-18 and fewer zeros than its width; for a parameter
          (norm above 0 and below 1e-18) a row with a norm above 0 and below 1e-18."""
        n_rows = len(layout.row_length)
        norms, param_norms, sums, zeros = (raw[k * n_rows:(k + 1) * n_rows] for k in range(4))
        total = float(np.dot(norms, norms)) * (1 + 1e-6 + n_rows * 2.0 ** -22)
        if not (total < total_limit and math.isfinite(float(np.dot(param_norms, param_norms)))): return False
        if (np.abs(sums) > layout.spread_bound * norms).any() and not _spread_safe(norms, sums, layout): return False
        tiny = raw[:2 * n_rows] < 2 * TINY_NORM  # the gradients' row norms, then the parameters'
        tiny[:n_rows] &= zeros < layout.row_width
        tiny[n_rows:] &= param_norms > 0
        return not tiny.any()

    def _measure(self, grads, params, extra, to_host, keep=False):
        """One step of a caller that builds its own lists (as `_collect`): the reductions, their one host copy
        through `to_host`, and `assemble`. Returns `(values, hist, the host values of extra)`."""
        host = to_host(self._collect(grads, params, extra, keep))
        values, hist = self.assemble(host)
        return values, hist, host[len(host) - sum(e.numel() for e in extra):]

    def __call__(self, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
        "Statistics of `grads` and `params` as a float32 CPU tensor of shape `(len(grads), len(METRICS))` (one host copy)."
        raw = self.collect(grads, params)
        return torch.from_numpy(self.assemble(raw.cpu().numpy())[0])

    def refine(self, values: np.ndarray, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]):
        """Fix, in float64, the rows of `values` (a host copy of this object's result for `grads`, `params`)
        that float32 sums cannot give: non-finite norms (NaN/Inf elements, or squares that overflow
        float32 above about 1.8e19), norms of tiny non-zero gradients or parameters whose squares underflow
        (a float32 or bfloat16 parameter of two or more elements, all below about 2.6e-23 in magnitude, may read 0:
        its squares vanish), and standard deviations lost to cancellation (a mean much larger than the std).
        Returns `(values, counts)`, `counts` the NaN and Inf elements per row.

        Healthy rows cost nothing: the extra work, the one extra host copy and the copy of `values` (returned
        as it is when no row needs fixing) happen only on steps that have such rows."""
        n = len(self.shapes)
        values = np.asarray(values, np.float32).reshape(n, len(METRICS))
        counts = np.zeros((n, 2), np.int64)
        with np.errstate(invalid='ignore', over='ignore'):
            # flagged: a non-finite norm; a std lost to cancellation, std^2 (numel - 1) < 1e-3 grad_norm^2; a norm under
            # 1e-18 of a gradient that is not all zeros (squares below ~1e-45 vanish in float32: some may be lost), or of a
            # parameter that reads above 0 (one whose every square vanished reads 0, alike to a parameter of zeros)
            grad_norm, param_norm = values[:, _GRAD_NORM], values[:, _PARAM_NORM]
            suspect = ~np.isfinite(grad_norm + param_norm)  # both are >= 0: the sum is finite when both are
            suspect |= values[:, _STD] < grad_norm * self._cancel_scale
            suspect |= (grad_norm < TINY_NORM) & (values[:, _ZERO_FRAC] < 1)
            suspect |= (param_norm > 0) & (param_norm < TINY_NORM)
        if not suspect.any(): return values, counts
        rows = np.flatnonzero(suspect)
        values = values.copy()
        # float64 copies of the flagged tensors, a group of at most chunk_elements / 8 elements at a time
        exact = _exact_stats([grads[i] for i in rows], [params[i] for i in rows], max(1, self.chunk_elements // 8))
        host = exact.cpu().numpy()  # one copy, on these rare steps only
        for j, column in enumerate(('grad_norm', 'param_norm', 'grad_mean', 'grad_std')):
            values[rows, METRICS.index(column)] = host[:, j]
        counts[rows] = host[:, 4:6].astype(np.int64)
        values[rows, METRICS.index('unit_spread')] = host[:, 6]
        return values, counts


class _PerDevice:
    """`LayerStats`' per-step work for parameters on several devices (a model split between GPUs, or between the
    CPU and a GPU): one `LayerStats` per device, so each device reduces its own gradients and makes one host copy
    per step. `devices[i]` is the device of the i-th gradient; rows come back in the order of the gradients."""
    def __init__(self, devices, shapes, zero_tol, hist, hist_sample):
        by_device = {}
        for i, device in enumerate(devices): by_device.setdefault(device, []).append(i)
        self.groups = [(np.array(index), LayerStats([shapes[i] for i in index], zero_tol, hist, hist_sample))
                       for index in by_device.values()]
        self.groups[0][1]._extra_room = 1 + len(shapes)  # the first device's copy carries `extra` for every tensor
        self.n, self.hist, self._order = len(shapes), hist, None

    def gather(self, values):
        """`values` (one 0-d tensor per gradient, each on its gradient's device) as one tensor on the first device, in
        their order: stacked per device and moved once per other device (not once per value)."""
        device = values[self.groups[0][0][0]].device
        parts = torch.cat([torch.stack([values[i] for i in index]).to(device) for index, _ in self.groups])
        if self._order is None or self._order.device != device:
            self._order = torch.from_numpy(np.argsort(np.concatenate([index for index, _ in self.groups]))).to(device)
        return parts[self._order]

    def __len__(self): return self.n

    def _measure(self, grads, params, extra, to_host, keep=False):
        "As `LayerStats._measure`; `extra` travels with the first device's copy."
        values = np.empty((self.n, len(METRICS)), np.float32)
        hist = np.empty((self.n, len(HIST_BINS)), np.int64) if self.hist else None
        for k, (index, stats) in enumerate(self.groups):
            part, part_hist, part_extra = stats._measure([grads[i] for i in index], [params[i] for i in index],
                                                         extra if k == 0 else [], to_host, keep)
            values[index] = part
            if hist is not None: hist[index] = part_hist
            if k == 0: host_extra = part_extra
        return values, hist, host_extra

    def _update_norms(self, params):
        "As `LayerStats.update_norms`, each device's by its own `LayerStats`, gathered on the first device."
        moved = [None] * self.n
        for index, stats in self.groups:
            for i, norm in zip(index, stats._update_norms([params[i] for i in index]).unbind()): moved[i] = norm
        return self.gather(moved)

    def refine(self, values, grads, params):
        "As `LayerStats.refine`, each device's rows by its own `LayerStats`."
        values, counts = np.array(values, np.float32).reshape(self.n, len(METRICS)), np.zeros((self.n, 2), np.int64)
        for index, stats in self.groups:
            values[index], counts[index] = stats.refine(values[index], [grads[i] for i in index], [params[i] for i in index])
        return values, counts


_WIDE = (torch.float32, torch.float64)
_SHAPE, _DTYPE = operator.attrgetter('shape'), operator.attrgetter('dtype')
_DATA_PTR = torch.Tensor.data_ptr
_GRAD_NORM, _PARAM_NORM, _STD, _ZERO_FRAC = (METRICS.index(c) for c in ('grad_norm', 'param_norm', 'grad_std', 'zero_frac'))


def _unit_columns(rows, squares, layout, out):
    """`shared_zero_frac` and `unit_spread` of every tensor, into `out[:, 7]` and `out[:, 8]`, from `_assemble_steps`'
    `rows` (steps, `_ROWS`, rows: each unit's squared gradient norm and its zero count, float64) and each tensor's sum
    of `squares`."""
    zeros = rows[:, 3]
    live = zeros < layout.row_length  # not dead: some element (padding excepted) above zero_tol
    share = np.where(live, (zeros - (layout.row_length - layout.fan_in)) / layout.fan_in, np.inf)
    shared = np.minimum.reduceat(share, layout.starts, axis=1)
    out[:, 7] = np.where(np.isinf(shared) | ~layout.has_units, np.nan, shared)
    # the spread of the units' norms and of their sums (scaled to a norm's size by the fan-in's square root), from their
    # sums and sums of squares in float64 (exact enough at 0 for equal units), over the mean norm
    norms, sums = np.sqrt(rows[:, 0]), rows[:, 2] / np.sqrt(layout.fan_in)
    first = np.add.reduceat(norms, layout.starts, axis=1)
    spread = _spread_of_units(first, squares, np.add.reduceat(sums, layout.starts, axis=1),
                              np.add.reduceat(sums * sums, layout.starts, axis=1), layout.units)
    out[:, 8] = np.where(layout.has_units & (layout.units > 1) & (first > 0), spread, np.nan)


def _spread_of_units(norm_sum, norm_squares, sum_sum, sum_squares, units):
    """`unit_spread` (numpy or torch) from, per tensor, the sum and the sum of squares of its units' norms and of their
    sums (each over the square root of the fan-in), and its number of `units`: sqrt(var(norms) + var(sums)) / mean(norm),
    the variances over the units. The caller masks the tensors without units, with one, or without any gradient."""
    mean = norm_sum / units
    variance = (norm_squares / units - mean * mean) + (sum_squares / units - (sum_sum / units) ** 2)
    return (variance * (variance > 0)) ** 0.5 / mean


def _spread_safe(norms, sums, layout) -> bool:
    """Whether each tensor's sum of squares minus (sum)^2 / numel, from its rows' finite `norms` and `sums` added up
    in float64 as `LayerStats.assemble` adds them, stays at or above 1% of its sum of squares: `refine` redoes those
    below 0.1%, so rounding cannot carry one across."""
    rows = np.empty((2, len(norms)))
    rows[0], rows[1] = norms, sums
    np.square(rows[0], out=rows[0])
    squares, total = np.add.reduceat(rows, layout.starts, axis=1)
    spread = squares - total * (total / layout.numel)
    return not ((spread < 0.01 * squares) & (layout.numel > 1)).any()


def _norms(tensors):
    "L2 norms in one batched call (two with mixed precisions); half-precision tensors accumulate in float32."
    wide = [t.dtype in _WIDE for t in tensors]
    if all(wide): return torch._foreach_norm(tensors, 2)
    if not any(wide): return torch._foreach_norm(tensors, 2, dtype=torch.float32)
    out = [None] * len(tensors)
    for keep, kwargs in ((True, {}), (False, {'dtype': torch.float32})):
        where = [i for i, w in enumerate(wide) if w == keep]
        for i, norm in zip(where, torch._foreach_norm([tensors[i] for i in where], 2, **kwargs)): out[i] = norm
    return out


def _nonempty(numel: np.ndarray):
    "Where the tensors of `numel` elements have any (empty ones have no update norm to check): an index, or all."
    return np.flatnonzero(numel > 0) if (numel == 0).any() else slice(None)


def _within_float32_range(norms: np.ndarray) -> bool:
    """Whether every one of `norms` lies in [TINY_NORM, HUGE_NORM], where float32 sums of squares lose nothing to
    underflow or overflow (False with a NaN): two numpy calls, whatever the number of tensors."""
    return len(norms) == 0 or bool(norms.min() >= TINY_NORM and norms.max() <= HUGE_NORM)


def _exact_norms(norms, tensors):
    "Take again in float64, in place in `norms` (float64, on the CPU), those of float32 `tensors` outside [TINY_NORM, HUGE_NORM]."
    suspect = (norms < TINY_NORM) | (norms > HUGE_NORM)
    for i in torch.nonzero(suspect).flatten().tolist():
        if tensors[i].dtype != torch.float64: norms[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64)


def _sum_row_norms(layout):
    """Per tensor, the update norm from its rows' (`layout.update_rows`): their squares summed in float64 (a tall
    narrow tensor adds up millions of rows one by one); 0 for an empty tensor."""
    squares = layout.update_rows.square()
    return layout.update_sums.zero_().index_add_(0, layout.row_owner_index, squares).sqrt()


def _exact_row_norms(layout):
    """Take again in float64 the update norms of the rows (`layout.update_rows`, of the kept differences `c.kept`, on
    the CPU) of float32 chunks that read below `TINY_NORM` or above `HUGE_NORM`: a gather and a norm of those rows.
    Called only when some tensor's norm is outside that range, as `refine` redoes only such gradients."""
    rows = layout.update_rows
    suspect = (rows < TINY_NORM) | (rows > HUGE_NORM)
    at = 0
    for c in layout.chunks:
        if c.dtype != torch.float64:
            index = torch.nonzero(suspect[at:at + c.n_rows]).flatten()
            if len(index): rows.index_copy_(0, index + at, torch.linalg.vector_norm(c.kept.index_select(0, index), dim=1, dtype=torch.float64))
        at += c.n_rows


def _exact_stats(grads, params, chunk_elements=CHUNK_ELEMENTS):
    """Float64 gradient norm, parameter norm, mean, std (as `torch.std`), NaN and Inf counts and `unit_spread` of each
    gradient: a `(len(grads), 7)` float64 tensor on their device. A fixed number of batched ops per group of
    tensors of at most `chunk_elements` elements together (one per tensor above that), whatever the number
    of tensors: a deep net whose early gradients underflow every step must not pay a loop per tensor."""
    out, group, size = [], [], 0
    for i, g in enumerate(grads):
        if group and size + g.numel() > chunk_elements:
            out.append(_exact_group([grads[j] for j in group], [params[j] for j in group])); group, size = [], 0
        group.append(i); size += g.numel()
    if group: out.append(_exact_group([grads[j] for j in group], [params[j] for j in group]))
    return torch.cat(out)


def _exact_group(grads, params):
    device = grads[0].device
    with torch.no_grad():
        sizes = [g.numel() for g in grads]
        numel = torch.tensor(sizes, device=device)
        owner = torch.repeat_interleave(torch.arange(len(grads), device=device), numel,
                                        output_size=sum(sizes))  # output_size: no device sync
        g = torch.cat([t.reshape(-1) for t in grads]).to(torch.float64)
        p = torch.cat([t.reshape(-1) for t in params]).to(torch.float64)
        per_tensor = lambda x: torch.zeros(len(grads), *x.shape[1:], dtype=torch.float64, device=device).index_add_(0, owner, x)
        n = numel.to(torch.float64)
        # one segmented sum for five columns: sum, sum of squares, parameter sum of squares, NaN and Inf
        total, grad_sq, param_sq, nans, infs = per_tensor(torch.stack(
            [g, g * g, p.square_(), torch.isnan(g).to(torch.float64), torch.isinf(g).to(torch.float64)], dim=1)).unbind(1)
        mean = total / n
        centred = (g - mean[owner]).square_()   # two passes: the std of a near-constant gradient stays exact
        std = (per_tensor(centred) / (n - 1)).sqrt().masked_fill(numel < 2, math.nan)
        return torch.stack([grad_sq.sqrt(), param_sq.sqrt(), mean, std, nans, infs, _exact_unit_spread(grads, g, grad_sq)], dim=1)


def _exact_unit_spread(grads, flat, squares):
    """`unit_spread` of each of `grads` in float64, from `flat` (their elements, float64, concatenated) and each one's sum
    of `squares`: the units' (rows along dim 0) norms, then std / mean over them; NaN without 2+ units or any gradient."""
    device = flat.device
    units = [g.shape[0] if g.dim() >= 2 and g.shape[0] > 0 else 1 for g in grads]
    lengths = [max(1, g.numel() // u) for g, u in zip(grads, units) for _ in range(u)]
    row_length = torch.tensor(lengths, device=device)
    row_of = torch.repeat_interleave(torch.arange(len(row_length), device=device), row_length, output_size=len(flat))
    per_row = torch.zeros(len(row_length), 2, dtype=torch.float64, device=device).index_add_(
        0, row_of, torch.stack([flat * flat, flat], dim=1))
    norms, sums = per_row[:, 0].sqrt(), per_row[:, 1] / row_length.to(torch.float64).sqrt()
    tensor_of_row = torch.repeat_interleave(torch.arange(len(grads), device=device), torch.tensor(units, device=device),
                                            output_size=len(row_length))
    per_tensor = torch.zeros(len(grads), 3, dtype=torch.float64, device=device).index_add_(
        0, tensor_of_row, torch.stack([norms, sums, sums * sums], dim=1))
    n_units = torch.tensor(units, dtype=torch.float64, device=device)
    spread = _spread_of_units(per_tensor[:, 0], squares, per_tensor[:, 1], per_tensor[:, 2], n_units)
    has_units = torch.tensor([g.dim() >= 2 and u > 1 for g, u in zip(grads, units)], device=device)
    return spread.masked_fill(~has_units | (per_tensor[:, 0] == 0), math.nan)


def count_nonfinite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    "Number of NaN and of ±Inf elements in each of `grads`, as an int64 tensor of shape `(len(grads), 2)`."
    _check_tensors(grads, 'grads')
    if not grads: return torch.zeros(0, 2, dtype=torch.long)
    with torch.no_grad():
        return torch.stack([torch.stack([torch.isnan(g).sum(), torch.isinf(g).sum()]) for g in grads])


HIST_DECADES = tuple(range(-16, 4))
"Decades of the magnitude histogram: bin `1e{k}` holds the elements with 10**k <= |g| < 10**(k+1)."
HIST_BINS = (('zero', 'tiny') + tuple(f'1e{k}' for k in HIST_DECADES) + ('huge', 'inf', 'nan'))
"""Bins of `MagnitudeHistogram`, in order: `zero` (|g| <= zero_tol), `tiny` (above zero_tol, below
10**HIST_DECADES[0]), one bin per decade, `huge` (finite, at least 10**(HIST_DECADES[-1]+1)), `inf`, `nan`."""


def _spread(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """`k` distinct indices out of `n`, spread over the whole tensor without following its rows or columns:
    i -> (a*i + b) mod n with `a` a prime that does not divide `n` (a permutation of 0..n-1), sorted.
    Costs O(k), not O(n) as a random permutation would."""
    a = next(p for p in (2654435761, 2246822519, 3266489917, 668265263, 374761393) if n % p)
    b = (seed * 40503 + 12345) % n
    return torch.sort((torch.arange(k, dtype=torch.int64) * a + b) % n).values


class MagnitudeHistogram:
    """How the elements of each gradient spread over orders of magnitude (log10 |g| bins).

    For each tensor, counts its elements in the bins of `HIST_BINS`. A tensor with more than
    `sample` elements is counted on a fixed sample of `sample` of its elements, chosen once and
    reused every step, so the cost per step is bounded by `sample` elements per tensor whatever the
    model's size; `sample=None` counts every element. The sample is an evenly spread set of indices
    (a multiplicative hash of 0..sample-1, offset by `seed`), so it follows no row or column pattern
    of the weights. Exact NaN/Inf counts of whole tensors are `LayerStats.refine`'s job.
    The bins read float32 bits: float64 values are rounded to float32 first (magnitudes beyond float32's
    range keep their `huge` or `tiny` bin, and `zero_tol` is applied before rounding), so a float64 value
    within float32 rounding (about 6e-8 relative) of a power of ten may count in the bin next to it.
    """
    def __init__(self, shapes: Sequence[torch.Size], zero_tol: float = 0.0, sample: int | None = 2048, seed: int = 0):
        sample = _positive_int(sample, 'sample', allow_none=True)
        if not _is_int(seed):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}")
        seed = int(seed)
        self.zero_tol, self.sample = check_zero_tol(zero_tol), sample
        self.tol_bits = _float32_bits(_tol_below(self.zero_tol, torch.float32)) if self.zero_tol > 0 else None
        numels = [s.numel() for s in _check_shapes(shapes)]
        self.index = [None if sample is None or n <= sample else _spread(n, sample, seed) for n in numels]
        sizes = torch.tensor([n if i is None else len(i) for n, i in zip(numels, self.index)], dtype=torch.long)
        self.sample_sizes = sizes
        self.owner_offset = torch.repeat_interleave(torch.arange(len(numels)) * len(HIST_BINS), sizes)
        self._on_device = {}

    def _meta(self, device):
        if device not in self._on_device:
            self._on_device[device] = ([None if i is None else i.to(device) for i in self.index],
                                       self.owner_offset.to(device))
        return self._on_device[device]

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        "Counts as an int64 tensor of shape `(len(grads), len(HIST_BINS))`."
        _check_tensors(grads, 'grads')
        if len(grads) != len(self.index):
            raise ValueError(f"`grads` must hold {len(self.index)} tensors (the planned shapes), got {len(grads)}")
        if not grads: return torch.zeros(0, len(HIST_BINS), dtype=torch.long)
        index, owner_offset = self._meta(grads[0].device)
        with torch.no_grad():
            flat = [g.reshape(-1) for g in grads]
            picked = torch.cat([f if i is None else f.index_select(0, i) for f, i in zip(flat, index)])
            wide = picked.dtype == torch.float64
            if wide: picked = _float32_magnitudes(picked, self.zero_tol)
            return _bin_counts(picked, owner_offset, len(grads), self.tol_bits, nonnegative=wide)


_DECADE_TABLES = {}
_FLOAT32_MAX, _FLOAT32_TINIEST = torch.finfo(torch.float32).max, 2.0 ** -149


def _float32_magnitudes(x: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """|x| of float64 values as float32 in the same histogram bins (the bins read float32 bits): magnitudes
    <= `zero_tol` become 0, finite ones above float32's range its largest finite value (`huge`, not `inf`),
    and nonzero ones below it its smallest subnormal (`tiny`, not `zero`); Inf and NaN stay as they are."""
    x = x.abs()
    x = torch.where(x <= zero_tol, 0.0, torch.where(torch.isfinite(x) & (x > _FLOAT32_MAX), _FLOAT32_MAX, x))
    return torch.where((x > 0) & (x < _FLOAT32_TINIEST), _FLOAT32_TINIEST, x).float()


def _bin_counts(picked: torch.Tensor, owner_offset: torch.Tensor, n_tensors: int, tol_bits: int | None,
                out: torch.Tensor | None = None, ones: torch.Tensor | None = None, nonnegative: bool = False) -> torch.Tensor:
    """Histogram counts `(n_tensors, len(HIST_BINS))` of the values `picked` (signed or not), value k belonging
    to tensor `owner_offset[k] // len(HIST_BINS)`; elements with float32 bits <= `tol_bits` go to `zero`.
    Counted into `out` (flat, integer) when given, with `ones` (a one of its dtype) as the increment.
    `nonnegative`: `picked` holds |g| already (float32), so its bits need no clearing of the sign."""
    device = picked.device
    if device not in _DECADE_TABLES:
        low, step = _decade_tables()
        _DECADE_TABLES[device] = low.to(device, torch.int64), step.to(device)
    bin_low, bin_step = _DECADE_TABLES[device]
    # |g| as float32 bits: for non-negative floats, integer order is float order, and the exponent
    # field picks a row of two small tables (see `_decade_tables`): exact, and integer ops only
    bits = picked.float().view(torch.int32)
    if not nonnegative: bits = bits.bitwise_and(0x7FFFFFFF)
    exponent = bits.bitwise_right_shift(23)
    bins = bin_low.index_select(0, exponent).add_(bits >= bin_step.index_select(0, exponent))
    if tol_bits is not None: bins.masked_fill_(bits <= tol_bits, 0)
    # scatter_add_, not bincount: bincount reads its input's max back to the host (a sync on CUDA)
    counts = torch.zeros(n_tensors * len(HIST_BINS), dtype=torch.int64, device=device) if out is None else out.zero_()
    if ones is None: ones = torch.ones(1, dtype=counts.dtype, device=device)
    counts.scatter_add_(0, bins.add_(owner_offset), ones.expand(len(bins)))
    return counts.view(n_tensors, len(HIST_BINS))


def _float32_bits(x: float) -> int:
    "The bit pattern of the float32 `x` as an int."
    return int(np.array(x, dtype=np.float32).view(np.int32))


def _decade_tables():
    """For each float32 exponent field e (0-255): `low[e]`, the `HIST_BINS` index of the smallest magnitude
    with that exponent, and `step[e]`, the bit pattern from which the magnitude is one bin higher (the
    first float32 >= the next power of ten inside that octave; never reached when there is none).
    Exponent 0 holds zero and subnormals (`step` 1: subnormals are `tiny`); 255 holds Inf and NaN."""
    from fractions import Fraction
    lo, hi = HIST_DECADES[0], HIST_DECADES[-1]
    def bin_of(k): return 1 if k < lo else len(HIST_BINS) - 3 if k > hi else 2 + k - lo
    never = 0x7FFFFFFF
    low, step = np.zeros(256, np.int32), np.full(256, never, np.int64)
    low[0], step[0] = 0, 1
    low[255], step[255] = len(HIST_BINS) - 2, 0x7F800001       # Inf, then NaN one bin higher
    for e in range(1, 255):
        start, end = Fraction(2) ** (e - 127), Fraction(2) ** (e - 126)
        k = math.floor(math.log10(start))
        while Fraction(10) ** k > start: k -= 1
        while Fraction(10) ** (k + 1) <= start: k += 1
        low[e] = bin_of(k)
        boundary = Fraction(10) ** (k + 1)
        if boundary < end and bin_of(k + 1) != bin_of(k):
            first = np.float32(float(boundary))
            if Fraction(float(first)) < boundary: first = np.nextafter(first, np.float32(np.inf))
            step[e] = _float32_bits(first)
    return torch.from_numpy(low), torch.from_numpy(step.astype(np.int32))
