"""The exact float64 fallbacks: `refine` redoes in float64 the rare tensors whose float32 sums cannot be trusted
(NaN/Inf, norms that overflow or underflow, a std lost to cancellation) and counts their NaN and Inf elements; healthy
steps cost nothing here. `count_nonfinite` counts NaN and Inf elements on its own."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..checks import _check_tensors
from .layout import CHUNK_ELEMENTS
from .metrics import METRICS, _GRAD_NORM, _PARAM_NORM, _STD, _ZERO_FRAC, _spread_of_units

__all__ = ['count_nonfinite']


# a float32 norm below this may have lost squares to underflow (elements under about 1e-22 lose precision, under
# about 2.6e-23 vanish): `LayerStats.refine` redoes gradients and parameters below it, `_exact_norms` updates;
# one above HUGE_NORM may have overflowed (a float32 sum of squares ends at about 3.4e38: norms at about 1.8e19)
TINY_NORM, HUGE_NORM = 1e-18, 1e19


def _refine(stats, values: np.ndarray, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]):
    """Fix, in float64, the rows of `values` (a host copy of this object's result for `grads`, `params`)
    that float32 sums cannot give: non-finite norms (NaN/Inf elements, or squares that overflow
    float32 above about 1.8e19), norms of tiny non-zero gradients or parameters whose squares underflow
    (a float32 or bfloat16 parameter of two or more elements, all below about 2.6e-23 in magnitude, may read 0:
    its squares vanish), and standard deviations lost to cancellation (a mean much larger than the std).
    Returns `(values, counts)`, `counts` the NaN and Inf elements per row.

    Healthy rows cost nothing: the extra work, the one extra host copy and the copy of `values` (returned
    as it is when no row needs fixing) happen only on steps that have such rows."""
    n = len(stats.shapes)
    values = np.asarray(values, np.float32).reshape(n, len(METRICS))
    counts = np.zeros((n, 2), np.int64)
    with np.errstate(invalid='ignore', over='ignore'):
        # flagged: a non-finite norm; a std lost to cancellation, std^2 (numel - 1) < 1e-3 grad_norm^2; a norm under
        # 1e-18 of a gradient that is not all zeros (squares below ~1e-45 vanish in float32: some may be lost), or of a
        # parameter that reads above 0 (one whose every square vanished reads 0, alike to a parameter of zeros)
        grad_norm, param_norm = values[:, _GRAD_NORM], values[:, _PARAM_NORM]
        suspect = ~np.isfinite(grad_norm + param_norm)  # both are >= 0: the sum is finite when both are
        suspect |= values[:, _STD] < grad_norm * stats._cancel_scale
        suspect |= (grad_norm < TINY_NORM) & (values[:, _ZERO_FRAC] < 1)
        suspect |= (param_norm > 0) & (param_norm < TINY_NORM)
    if not suspect.any(): return values, counts
    rows = np.flatnonzero(suspect)
    values = values.copy()
    # float64 copies of the flagged tensors, a group of at most chunk_elements / 8 elements at a time
    exact = _exact_stats([grads[i] for i in rows], [params[i] for i in rows], max(1, stats.chunk_elements // 8))
    host = exact.cpu().numpy()  # one copy, on these rare steps only
    for j, column in enumerate(('grad_norm', 'param_norm', 'grad_mean', 'grad_std')):
        values[rows, METRICS.index(column)] = host[:, j]
    counts[rows] = host[:, 4:6].astype(np.int64)
    values[rows, METRICS.index('unit_spread')] = host[:, 6]
    return values, counts


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
