"""The host side of a step: `_assemble_steps` turns host copies of `collect`'s result (one step or several at once)
into one row of `METRICS` per tensor with a few numpy calls over the rows, and `_routine` says, from the same copy,
whether a step needs nothing of `refine` (so `GradStats` may let it wait and assemble it with others)."""
from __future__ import annotations

import math

import numpy as np

from .exact import TINY_NORM
from .histogram import HIST_BINS
from .metrics import METRICS, _ROWS, _spread_of_units

__all__ = []


def _assemble_steps(stats, raws: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray | None]:
    """`assemble` for several steps at once: `raws` (steps, at least `layout.extra_at`), each a host copy of a
    `collect` result laid out by `layout`, gives `values` (steps, len(stats), len(METRICS)) and `hist` (steps,
    len(stats), len(HIST_BINS)) or None. Not checked. The same few numpy calls whatever the number of steps:
    between two training steps every call runs with cold caches (several us each), so `GradStats` assembles
    the steps it records in batches."""
    k, n, n_rows = len(raws), len(stats.shapes), len(layout.row_length)
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
    if stats.hist:
        hist = raws[:, layout.hist_at:layout.extra_at].view(np.int64 if raws.dtype == np.float64 else np.int32)
        hist = hist.astype(np.int64).reshape(k, n, len(HIST_BINS))
    return values, hist


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


def _routine(stats, raw: np.ndarray, layout, total_limit: float) -> bool:
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
