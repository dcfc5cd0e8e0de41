"""Per-tensor gradient statistics, computed in batched form with plain torch.

Nothing here knows fastai or pandas. Given the gradients and parameters of a model,
`LayerStats` returns one tensor of shape `(n_tensors, len(METRICS))` on the gradients'
device. The work is a handful of batched `torch._foreach_*` calls and small loops of
reductions that never leave the device: no `.item()` and no host copy per tensor or
per metric. The caller decides when to move the one result tensor to the host.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ['METRICS', 'LayerStats', 'count_nonfinite', 'check_zero_tol', 'HIST_BINS', 'HIST_DECADES', 'MagnitudeHistogram']

METRICS = ('grad_norm', 'param_norm', 'grad_max', 'grad_mean', 'grad_std',
           'zero_frac', 'dead_frac')
"Columns of the tensor `LayerStats` returns, in order."


def _tol_below(tol: float, dtype: torch.dtype) -> float:
    "The largest value of `dtype` that is <= `tol`: |g| <= it exactly when |g| <= `tol` (no rounding up of `tol`)."
    t = torch.tensor(tol, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)) if float(t) > tol else t)


def check_zero_tol(zero_tol) -> float:
    "`zero_tol` as a float, or a TypeError (not a number) / ValueError (negative, NaN, Inf) naming it."
    if isinstance(zero_tol, bool) or not isinstance(zero_tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"`zero_tol` must be a number, got {type(zero_tol).__name__}")
    if not math.isfinite(zero_tol) or zero_tol < 0:
        raise ValueError(f"`zero_tol` must be a finite number >= 0, got {zero_tol!r}")
    return float(zero_tol)


def _check_tensors(tensors, argname):
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"`{argname}` must be a list or tuple of tensors, got {type(tensors).__name__}")
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{argname}` must hold tensors only, got {type(t).__name__}")


class LayerStats:
    """Batched statistics of a fixed list of gradient tensors and their parameters.

    Build it once for a list of shapes (the shape metadata is precomputed), then call it
    every step with the current gradients and parameters. Statistics per tensor:

    - `grad_norm`: L2 norm of the gradient; `param_norm`: L2 norm of the parameter;
    - `grad_max`: largest |g|; `grad_mean`, `grad_std`: mean and standard deviation of the
      gradient's elements (`grad_std` with Bessel's correction, as `torch.std`; NaN for one element);
    - `zero_frac`: fraction of elements with |g| <= `zero_tol`;
    - `dead_frac`: fraction of units (slices along dim 0 of a tensor with 2+ dims: output
      neurons or channels) whose whole gradient is <= `zero_tol`; NaN for 0-D and 1-D tensors.

    Every pass over the gradients is a reduction that allocates nothing of the gradients' size:
    norms (`torch._foreach_norm`), per-unit max and min, sums and non-zero counts; the rest is
    arithmetic on a few short vectors. Sums accumulate in float32 (fast); `refine` redoes in float64
    the rare rows where that is not enough (overflow, NaN/Inf, cancellation in the std).
    NaN and Inf propagate into the norms, the max, the mean and the std as they are; `refine`
    counts them.
    """
    def __init__(self, shapes: Sequence[torch.Size], zero_tol: float = 0.0):
        self.zero_tol = check_zero_tol(zero_tol)
        self.shapes = [torch.Size(s) for s in shapes]
        self.rows = [s[0] if len(s) >= 2 and s[0] > 0 else 1 for s in self.shapes]
        self.numel = torch.tensor([s.numel() for s in self.shapes], dtype=torch.float64)
        self.n_units = torch.tensor([s[0] if len(s) >= 2 else math.nan for s in self.shapes], dtype=torch.float64)
        self.row_owner = torch.repeat_interleave(torch.arange(len(self.rows)), torch.tensor(self.rows, dtype=torch.long))
        self._on_device = {}

    def __len__(self): return len(self.shapes)

    def _meta(self, device):
        "The shape metadata, copied to `device` once and kept."
        if device not in self._on_device:
            self._on_device[device] = tuple(t.to(device) for t in (self.numel, self.n_units, self.row_owner))
        return self._on_device[device]

    def __call__(self, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
        "Statistics of `grads` and `params` as a float32 tensor of shape `(len(grads), len(METRICS))`."
        _check_tensors(grads, 'grads'); _check_tensors(params, 'params')
        if len(grads) != len(self.shapes) or len(params) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} gradients and parameters, "
                             f"got {len(grads)} and {len(params)}")
        for g, s in zip(grads, self.shapes):
            if g.shape != s: raise ValueError(f"a gradient has shape {tuple(g.shape)} where {tuple(s)} was planned")
        if not grads: return torch.empty(0, len(METRICS))
        device = grads[0].device
        numel, n_units, row_owner = self._meta(device)
        with torch.no_grad():
            sums = [*_norms(grads), *_norms(params)]
            sums += [g.sum() if g.dtype in _WIDE else g.sum(dtype=torch.float32) for g in grads]
            if self.zero_tol == 0: nonzero = [torch.count_nonzero(g) for g in grads]  # NaN counts as non-zero
            else: nonzero = [g.numel() - torch.count_nonzero(g.abs() <= _tol_below(self.zero_tol, g.dtype)) for g in grads]
            per_tensor = torch.cat([torch.stack(sums).double(), torch.stack(nonzero).double()]).view(4, -1)
            grad_norm, param_norm, grad_sum, nonzero = per_tensor
            # the largest |g| of each unit (row) is max(max g, -min g): no |g| temporary is made
            units = [g.reshape(r, -1) for g, r in zip(grads, self.rows)]
            row_max = torch.maximum(torch.cat([u.amax(1) for u in units]), torch.cat([u.amin(1) for u in units]).neg()).double()
            grad_max = torch.zeros_like(grad_norm).scatter_reduce_(0, row_owner, row_max, 'amax', include_self=False)
            dead_units = torch.zeros_like(grad_norm).index_add_(0, row_owner, (row_max <= self.zero_tol).double())
            grad_mean = grad_sum / numel
            var = (grad_norm * grad_norm - grad_sum * grad_mean).clamp_min_(0) / (numel - 1)
            return torch.stack([grad_norm, param_norm, grad_max, grad_mean, var.sqrt_().masked_fill_(numel < 2, math.nan),
                                1 - nonzero / numel, dead_units / n_units], dim=1).float()

    def refine(self, values: np.ndarray, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]):
        """Fix, in float64, the rows of `values` (a host copy of this object's result for `grads`, `params`)
        that float32 sums cannot give: non-finite norms (NaN/Inf elements, or squares that overflow
        float32 above about 1.8e19), norms of tiny non-zero gradients whose squares underflow, and
        standard deviations lost to cancellation (a mean much larger than the std). Returns `(values, counts)`, `counts` the NaN and Inf elements per row.

        Healthy rows cost nothing: the extra work and the one extra host copy happen only on
        steps that have such rows."""
        values = np.array(values, dtype=np.float32, copy=True).reshape(len(self.shapes), len(METRICS))
        counts = np.zeros((len(self.shapes), 2), np.int64)
        grad_norm, param_norm, grad_std = (values[:, METRICS.index(c)].astype(np.float64) for c in ('grad_norm', 'param_norm', 'grad_std'))
        numel = self.numel.numpy()
        zero_frac = values[:, METRICS.index('zero_frac')]
        with np.errstate(invalid='ignore', over='ignore'):
            cancelled = (numel > 1) & (grad_norm > 0) & (grad_std ** 2 * (numel - 1) < 1e-3 * grad_norm ** 2)
            # squares below ~1e-45 vanish in float32: a norm under 1e-18 may have lost (some of) them
            underflow = (grad_norm < 1e-18) & (zero_frac < 1)
        rows = np.flatnonzero(~np.isfinite(grad_norm) | ~np.isfinite(param_norm) | cancelled | underflow)
        if not len(rows): return values, counts
        with torch.no_grad():
            exact = torch.stack([torch.stack([g.double().norm(), p.double().norm(), g.double().mean(),
                                              g.double().std() if g.numel() > 1 else torch.tensor(math.nan, dtype=torch.float64, device=g.device)])
                                 for g, p in ((grads[i], params[i]) for i in rows)])
            exact = torch.cat([exact, count_nonfinite([grads[i] for i in rows]).to(exact)], dim=1)
        host = exact.cpu().numpy()  # one copy, on these rare steps only
        for j, column in enumerate(('grad_norm', 'param_norm', 'grad_mean', 'grad_std')):
            values[rows, METRICS.index(column)] = host[:, j]
        counts[rows] = host[:, 4:].astype(np.int64)
        return values, counts


_WIDE = (torch.float32, torch.float64)


def _norms(tensors):
    "L2 norms in one batched call; half-precision tensors accumulate in float32."
    if all(t.dtype in _WIDE for t in tensors): return torch._foreach_norm(tensors, 2)
    return torch._foreach_norm(tensors, 2, dtype=torch.float32)


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
    """
    def __init__(self, shapes: Sequence[torch.Size], zero_tol: float = 0.0, sample: int | None = 2048, seed: int = 0):
        if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
            raise ValueError(f"`sample` must be a positive int or None, got {sample!r}")
        self.zero_tol, self.sample = check_zero_tol(zero_tol), sample
        self._tol_bits = _float32_bits(_tol_below(self.zero_tol, torch.float32))
        numels = [torch.Size(s).numel() for s in shapes]
        self.index = [None if sample is None or n <= sample else _spread(n, sample, seed) for n in numels]
        sizes = torch.tensor([n if i is None else len(i) for n, i in zip(numels, self.index)], dtype=torch.long)
        self.sample_sizes = sizes
        self.owner_offset = torch.repeat_interleave(torch.arange(len(numels)) * len(HIST_BINS), sizes)
        self._on_device = {}

    def _meta(self, device):
        if device not in self._on_device:
            low, step = _decade_tables()
            self._on_device[device] = ([None if i is None else i.to(device) for i in self.index],
                                       self.owner_offset.to(device, torch.int32), low.to(device), step.to(device))
        return self._on_device[device]

    def __call__(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        "Counts as an int64 tensor of shape `(len(grads), len(HIST_BINS))`."
        _check_tensors(grads, 'grads')
        if len(grads) != len(self.index):
            raise ValueError(f"expected {len(self.index)} gradients, got {len(grads)}")
        if not grads: return torch.zeros(0, len(HIST_BINS), dtype=torch.long)
        index, owner_offset, bin_low, bin_step = self._meta(grads[0].device)
        with torch.no_grad():
            flat = [g.reshape(-1) for g in grads]
            picked = torch.cat([f if i is None else f.index_select(0, i) for f, i in zip(flat, index)])
            # |g| as float32 bits: for non-negative floats, integer order is float order, and the exponent
            # field picks a row of two small tables (see `_decade_tables`): exact, and integer ops only
            bits = picked.float().view(torch.int32).bitwise_and_(0x7FFFFFFF)
            exponent = bits.bitwise_right_shift(23)
            bins = bin_low.index_select(0, exponent).add_(bits >= bin_step.index_select(0, exponent))
            if self.zero_tol > 0: bins.masked_fill_(bits <= self._tol_bits, 0)
            counts = torch.bincount(bins.add_(owner_offset), minlength=len(grads) * len(HIST_BINS))
            return counts.view(len(grads), len(HIST_BINS))


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
