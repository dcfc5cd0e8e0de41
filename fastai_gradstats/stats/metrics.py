"""What `LayerStats` measures: the columns of its result (`METRICS`), what it reduces each row of a block to (`_ROWS`),
and the definitions its rooms share: a tensor's units (its rows), a zero (|g| <= zero_tol, exactly, in the gradient's
dtype) and `unit_spread` (numpy or torch alike). Adding a statistic starts here (see docs/architecture.md)."""
from __future__ import annotations

import math

import torch

__all__ = ['METRICS']


METRICS = ('grad_norm', 'param_norm', 'grad_max', 'grad_mean', 'grad_std',
           'zero_frac', 'dead_frac', 'shared_zero_frac', 'unit_spread')
"Columns of the tensor `LayerStats` returns, in order."


_ROWS = ('grad_norm', 'param_norm', 'sum', 'zeros', 'max')
"What `LayerStats` reduces each row of a block (a unit of a tensor) to, in the order of its result."


_GRAD_NORM, _PARAM_NORM, _STD, _ZERO_FRAC = (METRICS.index(c) for c in ('grad_norm', 'param_norm', 'grad_std', 'zero_frac'))


def _rows(shape: torch.Size) -> int:
    "Units of a tensor: its rows along dim 0 when it has 2+ dims (neurons, channels), else one row."
    return shape[0] if len(shape) >= 2 and shape[0] > 0 else 1


def _tol_below(tol: float, dtype: torch.dtype) -> float:
    "The largest value of `dtype` that is <= `tol`: |g| <= it exactly when |g| <= `tol` (no rounding up of `tol`)."
    t = torch.tensor(tol, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)) if float(t) > tol else t)


def _spread_of_units(norm_sum, norm_squares, sum_sum, sum_squares, units):
    """`unit_spread` (numpy or torch) from, per tensor, the sum and the sum of squares of its units' norms and of their
    sums (each over the square root of the fan-in), and its number of `units`: sqrt(var(norms) + var(sums)) / mean(norm),
    the variances over the units. The caller masks the tensors without units, with one, or without any gradient."""
    mean = norm_sum / units
    variance = (norm_squares / units - mean * mean) + (sum_squares / units - (sum_sum / units) ** 2)
    return (variance * (variance > 0)) ** 0.5 / mean
