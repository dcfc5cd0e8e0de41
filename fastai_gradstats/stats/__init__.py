"""Per-tensor gradient statistics, computed in batched form with plain torch.

Nothing here knows fastai or pandas. Given the gradients and parameters of a model,
`LayerStats.collect` leaves one step's reductions in one tensor on the gradients' device,
and `LayerStats.assemble` turns its host copy into one row of `METRICS` per tensor. The work
is a handful of batched `torch._foreach_*` calls and reductions over blocks of rows that
never leave the device: no `.item()` and no host copy per tensor or per metric. The caller
decides when to move the one result tensor to the host.

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

The rooms, one job each: `metrics` (what is measured: `METRICS` and the definitions they share), `layout` (the plan:
blocks of one work buffer and one result tensor, built once), `reductions` (each step's reductions on the device),
`graphs` (those replayed as one CUDA graph), `assembly` (the host copy turned into rows; whether a step is routine),
`exact` (the float64 fallbacks), `updates` (how far the optimizer moved each parameter), `histogram` (the magnitude
histogram), `devices` (one `LayerStats` per device), and `layer_stats` (`LayerStats`, their face). This package
re-exports their names: `fastai_gradstats.stats.LayerStats`, `.METRICS`, `.CHUNK_ELEMENTS`, ... as before.
"""
from __future__ import annotations

from ..checks import check_zero_tol
from .metrics import METRICS
from .histogram import HIST_BINS, HIST_DECADES, MagnitudeHistogram
from .reductions import LONG_ROW
from .graphs import _StepGraph
from .layout import CHUNK_ELEMENTS, PAD_ELEMENTS, _Chunk, _Layout
from .exact import HUGE_NORM, TINY_NORM, count_nonfinite
from .layer_stats import LayerStats
from .devices import _PerDevice   # with _StepGraph, _Chunk and _Layout: the classes pickles made before the split name here

__all__ = ['METRICS', 'LayerStats', 'count_nonfinite', 'check_zero_tol', 'HIST_BINS', 'HIST_DECADES', 'MagnitudeHistogram']

USE_CUDA_GRAPHS = True
"""On a CUDA device, replay each step's reductions as one CUDA graph (see `_StepGraph`); read when a layout is planned.
Set it to False before training to launch them one by one."""
