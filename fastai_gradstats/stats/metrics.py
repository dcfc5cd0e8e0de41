"""What `LayerStats` measures: the columns of its result (`METRICS`), what it reduces each row of a block to (`_ROWS`),
and the definitions its rooms share: a tensor's units (its rows), a zero (|g| <= zero_tol, exactly, in the gradient's
dtype) and `unit_spread` (numpy or torch alike). Adding a statistic starts here (see docs/architecture.md).

Statistics per tensor (the columns of `METRICS`):

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
"""
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
