"""The magnitude histogram: how the elements of each gradient spread over orders of magnitude (log10 |g| bins,
`HIST_BINS`), counted with integer ops on float32 bits; `MagnitudeHistogram` on its own, and `_bin_counts` for the
samples `LayerStats(hist=True)` leaves in its result every step."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..checks import _check_shapes, _check_tensors, _is_int, _positive_int, check_zero_tol
from .metrics import _tol_below

__all__ = ['HIST_BINS', 'HIST_DECADES', 'MagnitudeHistogram']


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
