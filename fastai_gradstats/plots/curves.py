"""Per-layer curves over iterations (`layer_curves`), and the size of the optimizer step relative to the weights
(`update_ratio`), its healthy band shaded."""
from __future__ import annotations

import math
import numbers

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.legend_handler import HandlerTuple

from .axes import _EDGE_MARKS, _edge_points, _integer_steps, _mark_edges, _new_ax, _wants_log
from .frames import _check_metric, _frame, _select_layers

__all__ = ['layer_curves', 'update_ratio']


_MAX_NAMED = 12           # curves of more layers are told apart by a depth colour bar, not named in the legend


def layer_curves(record, layers=None, metrics='grad_norm', ax=None, log=None):
    """Per-layer curves over iterations: one panel per metric in `metrics`, one line per layer in `layers`.

    `log` (True/False) forces a log or linear y scale; None: log when the metric is positive and spans
    two decades or more. Points a line cannot show are marked at the edge of the panel in `SPECIAL_COLORS`,
    edged in the layer's colour and named in the legend: NaN and +Inf at the top, -Inf and (on a log scale)
    exact zeros at the bottom (for `dead_frac`, a layer NaN at every step, which has no units, is not marked).
    Layers are coloured by depth (viridis, input darkest); up to 12 are named in the legend (right of the
    panels), more are told apart by a depth colour bar under the panels. Returns the Axes for one metric, else
    the Figure (one panel per metric; `ax` then not allowed)."""
    df, order = _frame(record)
    metric_list = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(metric_list, (list, tuple)):
        raise TypeError(f"`metrics` must be a metric name or a list of them, got {metrics!r}")
    metric_list = list(metric_list)
    if not metric_list: raise ValueError("`metrics` is empty")
    for m in metric_list: _check_metric(df, m, 'metrics')
    chosen = _select_layers(order, layers)
    if ax is not None and len(metric_list) > 1: raise ValueError("`ax` draws one metric; give one metric or no `ax`")
    if ax is None:
        fig, axes = plt.subplots(len(metric_list), 1, figsize=(9, 3 * len(metric_list)), squeeze=False, sharex=True)
        axes = list(axes[:, 0])
    else:
        axes = [_new_ax(ax, None)]
    depth = Normalize(0, max(len(chosen) - 1, 1))
    colors = plt.get_cmap('viridis')(depth(np.arange(len(chosen))))
    names = df['layer'].astype(str)
    for a, m in zip(axes, metric_list):
        steps, values, edges = [np.zeros(0)], [np.zeros(0)], [np.zeros((0, 4))]   # of the points to mark
        for color, layer in zip(colors, chosen):
            part = df[names == layer]
            x, y = part['step'].to_numpy(), part[m].to_numpy(float)
            a.plot(x, y, color=color, label=layer, marker='.' if len(part) == 1 else None)
            if m == 'dead_frac' and np.isnan(y).all(): continue   # a layer without units, not a NaN gradient
            steps.append(x); values.append(y); edges.append(np.repeat(color[None], len(x), axis=0))
        values = np.concatenate(values)
        use_log = _wants_log(df.loc[names.isin(chosen), m].to_numpy(float), log)
        if use_log: a.set_yscale('log', nonpositive='mask')   # a zero breaks the line (marked below), not plunges
        _mark_edges(a, np.concatenate(steps), _edge_points(values, use_log), np.concatenate(edges))
        a.set_ylabel(m)
        _integer_steps(a)
    axes[-1].set_xlabel('step')
    if len(chosen) > _MAX_NAMED: _depth_bar(axes, chosen, depth)
    for a in axes: _curves_legend(a, chosen, named=a is axes[0])
    return axes[0] if len(metric_list) == 1 else axes[0].figure


def _depth_bar(axes, chosen, depth):
    "The colour bar, under `axes`, of the layers' depth: their curves' colours, the first and last layer named."
    bar = axes[0].figure.colorbar(ScalarMappable(depth, 'viridis'), ax=axes, location='bottom', fraction=0.06,
                                  pad=0.25 / len(axes), aspect=40)
    bar.set_ticks([0, len(chosen) - 1], labels=[chosen[0], chosen[-1]], fontsize=7)
    bar.set_label('layer depth (0 = input)', fontsize=8)
    return bar


def _curves_legend(ax, chosen, named=True, first=()):
    """The legend of a curves panel, right of it: the `first` handles (a band), the edge marks, then (when `named`
    and at most 12) the layers' curves."""
    handles, labels = ax.get_legend_handles_labels()
    marks = [(h, l) for h, l in zip(handles, labels) if l in {label for _, label, _, _ in _EDGE_MARKS}]
    layer_names = set(chosen)
    curves = [(h, l) for h, l in zip(handles, labels) if l in layer_names] if named and len(chosen) <= _MAX_NAMED else []
    shown = list(first) + marks + curves
    if not shown:
        if ax.get_legend() is not None: ax.get_legend().remove()
        return None
    return ax.legend([h for h, _ in shown], [l for _, l in shown], loc='upper left', bbox_to_anchor=(1.01, 1),
                     borderaxespad=0, fontsize=7, ncol=2 if len(shown) > 9 else 1,
                     handler_map={tuple: HandlerTuple(ndivide=1)})


def _check_band(band):
    "`band` as a `(low, high)` pair of floats with 0 < low < high (finite), or None; else a TypeError/ValueError naming it."
    if band is None: return None
    if isinstance(band, (str, bytes)) or not hasattr(band, '__len__') or not hasattr(band, '__getitem__'):
        raise TypeError(f"`band` must be None or a (low, high) pair of positive numbers, got {type(band).__name__} {band!r}")
    if len(band) != 2:
        raise ValueError(f"`band` must be None or a (low, high) pair of positive numbers, got {band!r}")
    if any(isinstance(b, bool) or not isinstance(b, numbers.Real) for b in band):
        raise TypeError(f"`band` must be None or a (low, high) pair of positive numbers, got {band!r}")
    low, high = float(band[0]), float(band[1])
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise ValueError(f"`band` must be a (low, high) pair of finite numbers with 0 < low < high, got {band!r}")
    return low, high


def update_ratio(record, layers=None, ax=None, band=(1e-4, 1e-2)):
    """||Δw|| / ||w|| per layer over iterations (`GradStats(update_ratio=True)`), the healthy band around 1e-3 shaded.

    `band` is the `(low, high)` range shaded as healthy (0 < low < high), with a dashed line at 1e-3, or None for
    neither. The y axis is logarithmic when the drawn layers have a positive update ratio (a zero ratio, as of a
    frozen layer, is then marked at the bottom edge), else linear. Curves, legend and depth colour bar as in
    `layer_curves`. Returns the Axes."""
    band = _check_band(band)
    df, order = _frame(record)
    if 'update_ratio' not in df:
        raise ValueError("`record` has no `update_ratio` column: record with `GradStats(update_ratio=True)`")
    chosen = _select_layers(order, layers)
    values = df.loc[df['layer'].astype(str).isin(chosen), 'update_ratio'].to_numpy(float)
    positive = (np.isfinite(values) & (values > 0)).any()
    ax = layer_curves(record, chosen, 'update_ratio', ax=ax, log=True if positive else None)
    first = []
    if band is not None:
        label = f'healthy ~1e-3 ({band[0]:g}-{band[1]:g})'
        span = ax.axhspan(band[0], band[1], color='#2ca02c', alpha=0.12, label=label)
        first = [((span, ax.axhline(1e-3, color='#2ca02c', lw=1, ls='--')), label)]
    ax.set_title('size of the optimizer step relative to the weights')
    _curves_legend(ax, chosen, first=first)
    return ax
