"""Update norms: how far the optimizer step moved each parameter. `collect(keep_params=True)` keeps a copy of the
parameters (`_keep_params`: on the CPU the rows it copies for their norms anyway), and `_update_norms` takes the norm of
before - after, in float64 on the CPU where float32 would lose tiny or huge ones; the result stays on the device."""
from __future__ import annotations

import numpy as np
import torch

from .exact import HUGE_NORM, TINY_NORM
from .reductions import _buffer_dtype, _long_row_norms, _norms, _row_norms_into

__all__ = []


def _update_norms(stats, params):
    "`update_norms` for a caller that passes the list of parameters it gave to `_collect(keep=True)` (not checked)."
    layout = stats._last
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
            if not _within_float32_range(norms.numpy()[stats._nonempty]): _exact_norms(norms, layout.kept_tensors)
            return norms
        for c in layout.chunks:
            torch._foreach_sub_(c.kept_targets, c.pieces_of(params))
            _row_norms_into(c.update_rows, c.kept, c.long_rows)
            if c.update_staged is not None: c.update_staged.copy_(c.update_rows)
        norms = _sum_row_norms(layout)
        if on_cpu and not _within_float32_range(norms.numpy()[stats._nonempty]):
            _exact_row_norms(layout)
            norms = _sum_row_norms(layout)
        return norms
    finally:
        torch.set_grad_enabled(grad_mode)


def _keep_params(stats, layout, params):
    """Make room for `collect(keep_params=True)`'s copy (once per layout; the per-tensor copies again if `params`
    changed), and free the copies other layouts of this object kept (left behind by a change of dtype)."""
    for other in stats._layouts.values():
        if other is not layout: _drop_kept(other)
    if layout.keeps_rows:
        for c in layout.chunks:
            if getattr(c, 'kept', None) is None:
                c.kept = torch.zeros(c.n_rows, c.row_length, dtype=c.dtype, device=layout.device)
                c.kept_targets, _ = c.place(c.kept, stats.shapes, stats.row_length)
        if getattr(layout, 'row_owner_index', None) is None:
            layout.row_owner_index = torch.as_tensor(layout.row_owner, dtype=torch.long, device=layout.device)
            # the rows' update norms side by side in float64 (a float32 chunk's staged: one copy)
            layout.update_rows = torch.empty(len(layout.row_owner), dtype=torch.float64, device=layout.device)
            layout.update_sums = torch.empty(len(stats.shapes), dtype=torch.float64, device=layout.device)
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


def _drop_kept(layout):
    "Free what `LayerStats.collect(keep_params=True)` kept in `layout`."
    layout.kept, layout.kept_tensors = False, None
    for c in layout.chunks: c.kept = c.kept_targets = None


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
