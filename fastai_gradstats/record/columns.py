"""What a record holds, by name: the columns of its tables (`layers`, `steps`, `df`), the ones `df` derives, and
the statistics added since format 1 was first written."""
from __future__ import annotations

__all__ = ['LAYER_COLUMNS', 'STEP_COLUMNS', 'COUNT_COLUMNS', 'EXTRA_COLUMNS']


DERIVED_COLUMNS = ('grad_param_ratio', 'grad_rms')
"Per-layer columns derived when `df` is built: grad_norm / param_norm, and grad_norm / sqrt(numel)."


EXTRA_COLUMNS = ('update_norm',)
"""Optional stored per-layer columns: `update_norm` is ||w_after - w_before||, the size of the step the
optimizer took (0 on a skipped step); `df` then also derives `update_ratio` = update_norm / param_norm
(`param_norm` is measured before the step)."""


COUNT_COLUMNS = ('n_nan', 'n_inf')
"Integer per-layer columns: how many gradient elements are NaN, and how many are ±Inf."


LAYER_COLUMNS = ('name', 'module', 'shape', 'numel', 'depth', 'group', 'requires_grad')
"""Columns of `GradRecord.layers`: one row per parameter tensor, `depth` 0 nearest the input, `group` the
optimizer's parameter group (-1: not in the optimizer or unknown), `requires_grad` whether it required a gradient
in the last fit (None: unknown, as in runs saved before it was recorded)."""


STEP_COLUMNS = ('step', 'epoch', 'lr', 'loss', 'grad_norm', 'skipped', 'kept_every')
"""Columns of `GradRecord.steps`: one row per recorded optimizer step; `kept_every` is the stride at which
steps around this one are kept (`every`, or more where `keep_last` thinned old steps)."""


ADDED_METRICS = ('shared_zero_frac', 'unit_spread')
"Statistics of `METRICS` added after format 1 was first written: a run saved without them loads with NaN there."
