"""The layer x iteration heatmap of a per-layer metric (`heatmap`) and the table it draws (`metric_table`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.patches import Patch

from ..checks import _positive_int
from .axes import (MAX_LAYER_LABELS, SPECIAL_COLORS, _integer_steps, _label_steps, _layer_ticks, _legend_below,
                   _new_ax, _step_extent, _uneven, _wants_log)
from .frames import _check_metric, _check_one_rank, _frame, is_weight

__all__ = ['heatmap', 'metric_table']


def metric_table(record, metric='grad_norm', weights_only=False, by_module=False) -> pd.DataFrame:
    """The layer x step table that `heatmap` draws: one row per layer from input to output, one column per step;
    NaN where the metric is NaN and where the layer was not recorded at that step.

    `weights_only` keeps the parameters named `weight...` (`is_weight`); `by_module` combines each module's
    parameters first (see `fastai_gradstats.aggregate.by_module`); the two exclude each other. For `dead_frac`,
    which is NaN by definition for 1-D parameters (no units), the layers NaN at every step are left out."""
    return _metric_table(record, metric, weights_only, by_module)[0]


def _metric_table(record, metric, weights_only, by_module):
    "`metric_table`, and a boolean array of the same shape: whether the layer was recorded at that step."
    if by_module and weights_only:
        raise ValueError("`weights_only=True` and `by_module=True` do not go together: `by_module` combines each "
                         "module's weight and bias into one row; pass one of them")
    if by_module:
        from ..aggregate import by_module as _by_module
        record = _by_module(record)
        _check_one_rank(record, 'record', 'df', "`heatmap(by_module(record).query('rank == 0'))`, `by_module` "
                                                "from `fastai_gradstats`, without `by_module=True`")
    df, order = _frame(record)
    _check_metric(df, metric)
    if weights_only:
        order = [l for l in order if is_weight(l)]
        if not order: raise ValueError("`weights_only=True` left no layer: no parameter is named 'weight...'")
    table = df.pivot_table(index='layer', columns='step', values=metric, aggfunc='first', observed=True, dropna=False)
    table.index = table.index.astype(str)
    table = table.reindex(order).astype(float)
    if metric == 'dead_frac':  # NaN by definition for a 1-D parameter: not a NaN gradient
        table = table[table.notna().any(axis=1)]
        if table.empty: raise ValueError("`dead_frac` is NaN for every layer: it is defined for weights of two or more "
                                         "dimensions (a bias or a norm's scale has no units)")
    seen = pd.crosstab(df['layer'].astype(str), df['step']).reindex(index=table.index, columns=table.columns, fill_value=0)
    return table, seen.to_numpy() > 0


def heatmap(record, metric='grad_norm', ax=None, weights_only=False, by_module=False, log=None,
            cmap=None, max_labels=MAX_LAYER_LABELS):
    """Layer x iteration heatmap of a per-layer `metric` (`grad_norm`, `grad_param_ratio`, `dead_frac`, ...).

    Layers run from input (top) to output (bottom), steps from left to right. The colour scale is
    logarithmic when the metric is positive and spans two decades or more (`log=True/False` forces
    it); NaN, ±Inf (and, on a log scale, exact zeros) are drawn in `SPECIAL_COLORS` and named in the
    legend under the colour bar. `weights_only` keeps only weights; `by_module` combines each module's parameters
    (not both at once); for `dead_frac` the layers NaN at every step (1-D parameters, which have no units) are left
    out. `cmap` is the matplotlib colormap; None (the default) chooses: 'RdBu_r' centred on 0 (white) when the
    metric has both signs (`grad_mean`), else 'viridis'. A `cmap` given is used as it is, with a plain linear or
    log scale. `max_labels` (a positive int) caps the layer names written on the axis.
    Returns the Axes; `ax.images[0]` holds the metric, `ax.images[1]` (if any) the special cells."""
    max_labels = _positive_int(max_labels, 'max_labels')
    table, recorded = _metric_table(record, metric, weights_only, by_module)
    values = table.to_numpy()
    use_log = _wants_log(values, log)
    finite = np.isfinite(values)
    special = np.full(values.shape, np.nan)
    special[np.isnan(values) & recorded] = 1  # a layer not recorded at a step (added later, frozen) stays blank
    special[np.isinf(values)] = 2
    hidden = ~finite
    if use_log:
        special[finite & (values <= 0)] = 0
        hidden = hidden | (values <= 0)
    # a row per layer tall enough for its 7-point name, up to MAX_LAYER_LABELS rows (beyond that, names are thinned)
    ax = _new_ax(ax, (10, max(2.5, min(16, 0.18 * len(table) + 1.5))))
    shown = values[~hidden]
    signed = cmap is None and len(shown) and shown.min() < 0 < shown.max()
    if use_log: norm = LogNorm(shown.min(), shown.max()) if len(shown) else LogNorm(1e-8, 1)
    elif signed: norm = TwoSlopeNorm(0, shown.min(), shown.max())   # 0 white, each sign its own colour
    else: norm = Normalize(shown.min(), shown.max()) if len(shown) else Normalize(0, 1)
    if cmap is None: cmap = 'RdBu_r' if signed else 'viridis'
    x0, x1 = _step_extent(table.columns)
    extent = (x0, x1, len(table) - 0.5, -0.5)
    image = ax.imshow(np.ma.masked_array(values, hidden), aspect='auto', interpolation='nearest',
                      cmap=cmap, norm=norm, extent=extent)
    present = [i for i in range(3) if (special == i).any()]
    if present:
        ax.imshow(np.ma.masked_invalid(special), aspect='auto', interpolation='nearest', extent=extent,
                  cmap=ListedColormap([SPECIAL_COLORS[k] for k in ('zero', 'nan', 'inf')]), vmin=-0.5, vmax=2.5)
    bar = ax.figure.colorbar(image, ax=ax)
    bar.set_label(f"{metric}{' (log scale)' if use_log else ''}")
    if present:
        names = {0: 'zero', 1: 'NaN', 2: 'Inf'}
        _legend_below(ax, bar, [Patch(color=SPECIAL_COLORS[('zero', 'nan', 'inf')[i]], label=names[i]) for i in present])
    _layer_ticks(ax, list(table.index), 'y', max_labels)
    ax.set_xlabel('step'); ax.set_ylabel('layer (input at top)')
    if _uneven(table.columns): _label_steps(ax, list(table.columns))
    else: _integer_steps(ax)
    ax.set_title(f'{metric} per layer and step' + (' (by module)' if by_module else ''))
    return ax
