"""Every reduction of one step, on the device: a block's rows copied into the work buffer and reduced along them
(`_reduce_block`), tensors whose rows exceed the buffer reduced where they lie (`_reduce_direct`), the parameters'
norms, the histogram's counts and the caller's `extra` values, each written straight into its place in the layout's
one result tensor (`_reduce_step`: what a CUDA graph of the layout replays, as `LayerStats._reduce`). A fixed handful
of batched calls per block, whatever the number of tensors in it; no `.item()`, no host copy."""
from __future__ import annotations

import torch

from .histogram import _bin_counts, _float32_magnitudes
from .metrics import _tol_below

__all__ = []


_WIDE = (torch.float32, torch.float64)


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


def _reduce_step(stats, layout, grads, params, keep=False):
    """Every reduction of one step, launched one by one, into `layout.result` (what a CUDA graph of the layout replays);
    `keep`: the parameters' rows go to the chunks' kept copies (`layout.keeps_rows`) rather than the work buffer."""
    by_rows = params if layout.param_rows else None
    for c in layout.chunks:
        if c.direct: _reduce_direct(stats, c, grads, by_rows)
        else: _reduce_block(stats, c, grads, by_rows, keep)
        if c.staged is not None: torch._foreach_copy_(c.staged, c.out)
    if not layout.param_rows and layout.owner_list:
        norms = torch.stack(_norms([params[i] for i in layout.owner_list]))
        layout.param_row_out.index_copy_(0, layout.first_rows, norms.to(layout.dtype))
    if stats.hist:  # the chunks left every tensor's |g| sample in `layout.samples`
        _bin_counts(layout.samples, layout.hist_offset, len(grads), stats.histogram.tol_bits,
                    out=layout.hist_out, ones=layout.ones, nonnegative=True)


def _write_extra(layout, extra):
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


def _reduce_block(stats, c, grads, params, keep=False):
    """A block's rows of gradients, then of parameters (laid out alike; unless `params` is None), copied into the work
    buffer (the parameters into the chunk's kept copy with `keep`) and reduced."""
    torch._foreach_copy_(c.copy_targets, c.sources(grads))
    block = c.block  # our own copy: free to overwrite in place
    norm, param_norm, total, zeros, high = c.out
    torch.sum(block, 1, out=total); _row_norms_into(norm, block, c.long_rows)
    torch.amax(block.abs_(), 1, out=high)
    if stats.hist:  # `take`, not `index_select`: on the CPU it runs on every thread (a serial op lets idle threads sleep, and waking them costs more)
        if c.dtype == torch.float32: torch.take(block, c.sample_index, out=c.sample_out)
        else: c.sample_out.copy_(_float32_magnitudes(torch.take(block, c.sample_index), stats.zero_tol))
    torch.sum(block.le_(c.tol), 1, out=zeros)
    if params is None: return
    # the parameters' rows in the same places (one batched read, and one reduction whatever the number of tensors)
    if keep:  # into the chunk's own copy, kept for `update_norms` (its padding stays zero)
        torch._foreach_copy_(c.kept_targets, c.pieces_of(params))
        block = c.kept
    else: torch._foreach_copy_(c.copy_targets, c.sources(params))
    _row_norms_into(param_norm, block, c.long_rows)


def _reduce_direct(stats, c, grads, params):
    (i, _, _), = c.pieces
    g = grads[i]
    rows = g.reshape(stats.rows[i], -1)
    wide = dict(dtype=torch.float32) if g.dtype not in _WIDE else {}
    norm, param_norm, total, zeros, high = c.out
    row_norms = _long_row_norms if c.long_rows else lambda x, **kw: torch.linalg.vector_norm(x, dim=1, **kw)
    total.copy_(rows.sum(1, **wide)); norm.copy_(row_norms(rows, **wide))
    if params is not None:
        p = params[i]
        param_norm.copy_(row_norms(p.reshape(stats.rows[i], -1), **({'dtype': torch.float32} if p.dtype not in _WIDE else {})))
    high.copy_(torch.maximum(rows.amax(1), rows.amin(1).neg()))
    if stats.zero_tol == 0: zeros.copy_(c.row_length - torch.count_nonzero(rows, dim=1))
    else: zeros.copy_((rows.abs() <= _tol_below(stats.zero_tol, g.dtype)).sum(1))
    if stats.hist:
        picked = g.reshape(-1).index_select(0, c.sample_index)
        if picked.dtype == torch.float64: c.sample_out.copy_(_float32_magnitudes(picked, stats.zero_tol))
        else: c.sample_out.copy_(picked).abs_()
