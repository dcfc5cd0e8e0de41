"""Pictures of a record: layer x iteration heatmaps, magnitude histograms, gradient flow, curves.

Every function takes a `GradRecord` (live or loaded) or its tidy `.df` (`magnitude_hist` the record or its
`.hist`; `by_module=True` needs the record, whose layer table it reads), draws on `ax` when
given (else on a new figure), returns the Axes (or the Figure, for several panels) and never
calls `plt.show()`. Nothing here knows fastai. The same functions are methods of the record:
`record.plot_heatmap(...)` is `heatmap(record, ...)`.
"""
from __future__ import annotations

import heapq
import math
import numbers

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.legend_handler import HandlerTuple
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory, offset_copy

from .record import GradRecord, record_method
from .checks import _positive_int
from .stats import HIST_BINS, HIST_DECADES

__all__ = ['MAX_LAYER_LABELS', 'heatmap', 'magnitude_hist', 'gradient_flow', 'layer_curves', 'update_ratio', 'total_norm', 'compare',
           'metric_table', 'hist_table', 'flow_table', 'compare_table', 'is_weight', 'SPECIAL_COLORS']

SPECIAL_COLORS = {'zero': '#000000', 'nan': '#ff00ff', 'inf': '#ff8c00'}
"Colours of heatmap cells that a colour scale cannot show: exact zeros on a log scale, NaN, ±Inf."
_NOT_METRICS = {'step', 'epoch', 'layer', 'rank'}
_EMPTY_COLOR = '#8c8c8c'  # histogram bins without elements: a mid grey, far from both ends of magma
_MAX_NAMED = 12           # curves of more layers are told apart by a depth colour bar, not named in the legend


# --- inputs --------------------------------------------------------------------------------
def _frame(record, what='record'):
    "The tidy DataFrame and the layer order (input to output) of `record` (a GradRecord or its df)."
    if isinstance(record, GradRecord):
        df = record.df
        depth = record.layers.set_index('name')['depth']
        present = pd.unique(df['layer'].astype(str))
        order = sorted(present, key=lambda n: depth.get(n, math.inf))
    elif isinstance(record, pd.DataFrame):
        df = record
        if 'layer' not in df or 'step' not in df:
            raise ValueError(f"`{what}` must be a GradRecord or its `.df` (with `step` and `layer` columns)")
        order = _merged_order(df)
    else:
        raise TypeError(f"`{what}` must be a GradRecord or a DataFrame, got {type(record).__name__}")
    if df.empty: raise ValueError(f"`{what}` is empty: no step was recorded")
    _check_one_rank(df, what, 'df')
    return df, order


def _merged_order(df):
    """The layers of a tidy DataFrame from input to output. Each step's rows run from input to output, but a step
    need not hold every layer (a frozen body, a layer added later): the steps' orders are merged (a stable
    topological sort, ties by first appearance); where they contradict each other, the layers left over follow in
    order of first appearance."""
    codes, names = pd.factorize(df['layer'])  # numbered by first appearance
    names = [str(n) for n in names]
    steps = df['step'].to_numpy()
    if (codes < 0).any(): codes, steps = codes[codes >= 0], steps[codes >= 0]  # rows without a layer name
    if len(steps) > 1 and (np.diff(steps) < 0).any():  # rows sorted otherwise: each step's rows in their own order
        by_step = np.argsort(steps, kind='stable')
        codes, steps = codes[by_step], steps[by_step]
    # the order of a step is the chain of its neighbouring rows; the distinct links of all steps make the graph
    same = (steps[1:] == steps[:-1]) & (codes[1:] != codes[:-1])
    links = pd.unique(codes[:-1][same].astype(np.int64) * len(names) + codes[1:][same])
    before, after = np.divmod(links, len(names))
    incoming = np.bincount(after, minlength=len(names))
    successors = pd.Series(after).groupby(before).agg(list).to_dict() if len(links) else {}
    ready = [i for i in range(len(names)) if incoming[i] == 0]
    heapq.heapify(ready)
    order, placed = [], np.zeros(len(names), bool)
    while ready:
        i = heapq.heappop(ready)
        order.append(i); placed[i] = True
        for j in successors.get(i, ()):
            incoming[j] -= 1
            if incoming[j] == 0: heapq.heappush(ready, j)
    order += [i for i in range(len(names)) if not placed[i]]  # a cycle: the steps disagree
    return [names[i] for i in order]


def _check_one_rank(df, what, table, example=None):
    "Refuse the rows of several ranks, which would be drawn over (or added to) each other."
    if 'rank' in df and df['rank'].nunique() > 1:
        example = example or f"`{table}[{table}['rank'] == 0]` of its `.{table}`"
        raise ValueError(f"`{what}` is a merge of {df['rank'].nunique()} ranks, which would draw over each other: draw one "
                         f"rank's rows, e.g. {example}")


def is_weight(name: str) -> bool:
    "Whether the parameter called `name` is a weight (`fc.weight`, `rnn.weight_hh_l0`), not a bias or a buffer-like scale."
    if not isinstance(name, str): raise TypeError(f"`name` must be a parameter name (str), got {type(name).__name__} {name!r}")
    return name.rsplit('.', 1)[-1].startswith('weight')


def _metrics_of(df):
    return [c for c in df.columns if c not in _NOT_METRICS and pd.api.types.is_numeric_dtype(df[c])]


def _check_metric(df, metric, argname='metric'):
    available = _metrics_of(df)
    if not isinstance(metric, str) or metric not in available:
        raise ValueError(f"unknown `{argname}` {metric!r}; available: {', '.join(available)}")


def _select_layers(order, layers, argname='layers'):
    "The layers of `order` named in `layers` (None: all; one name or a list of names), in `order`'s order."
    if layers is None: return order
    if isinstance(layers, str): layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(l, str) for l in layers):
        raise TypeError(f"`{argname}` must be None, a layer name or a list of layer names, got {layers!r}")
    if not layers: raise ValueError(f"`{argname}` is empty: give at least one layer, or None for all")
    unknown = [l for l in layers if l not in order]
    if unknown: raise ValueError(f"unknown `{argname}` {unknown}; recorded layers: {', '.join(order)}")
    return [l for l in order if l in set(layers)]


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
        from .aggregate import by_module as _by_module
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


def _new_ax(ax, figsize):
    "`ax`, or a new figure's Axes when it is None."
    if ax is None: _, ax = plt.subplots(figsize=figsize)
    elif not isinstance(ax, Axes): raise TypeError(f"`ax` must be a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


MAX_LAYER_LABELS = 80
"Most layer names a heatmap or gradient flow writes on its axis (every layer of a resnet18 or xresnet18); more are thinned."


def _layer_ticks(ax, labels, axis='y', max_labels=MAX_LAYER_LABELS):
    "Label at most `max_labels` layers, evenly spread, so 200+ layers stay readable."
    n = len(labels)
    every = max(1, math.ceil(n / max_labels))
    ticks = list(range(0, n, every))
    size = 8 if n <= 20 else 7
    if axis == 'y':
        ax.set_yticks(ticks); ax.set_yticklabels([labels[i] for i in ticks], fontsize=size)
    else:
        ax.set_xticks(ticks); ax.set_xticklabels([labels[i] for i in ticks], fontsize=size, rotation=90)


def _uneven(steps) -> bool:
    "Whether the recorded `steps` are not evenly spaced (as after `keep_last` thinned the older ones)."
    steps = np.asarray(steps, float)
    return len(steps) > 2 and not np.allclose(np.diff(steps), steps[1] - steps[0])


def _step_extent(steps):
    """imshow's x extent for equally wide columns, one per step of `steps`: centred on the step numbers when they are
    evenly spaced, else on the columns' positions 0, 1, ... (`_label_steps` then writes the step numbers there)."""
    if _uneven(steps): return -0.5, len(steps) - 0.5
    steps = np.asarray(steps, float)
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    return steps[0] - half, steps[-1] + half


def _label_steps(ax, steps, max_labels=12):
    "The x axis of a step heatmap whose steps are unevenly spaced: the step numbers written under their columns."
    if not _uneven(steps): return
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(max_labels, len(steps))).round().astype(int))
    ax.set_xticks(ticks); ax.set_xticklabels([str(steps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel('step (one column per recorded step; unevenly spaced)')


def _wants_log(values, log):
    "Whether to draw `values` on a log scale: `log` when True/False (checked against them), else by their spread."
    if log is not None and not isinstance(log, (bool, np.bool_)):
        raise TypeError(f"`log` must be True, False or None, got {log!r}")
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log is not None:
        if log and not len(positive): raise ValueError("`log=True` needs some positive finite values to draw")
        if log and (finite < 0).any(): raise ValueError("`log=True` cannot draw negative values")
        return bool(log)
    return len(positive) > 0 and not (finite < 0).any() and positive.max() / positive.min() >= 100


def _compare_scale(values):
    """The y scale of a comparison panel, as `set_yscale` arguments. NaN (a shorter run's missing layers, a NaN step)
    is left aside. 'log' when the finite values are all positive; when some are exact zeros (dead ReLU layers) and
    the positive ones span a decade or more, 'symlog' linear below the decade of the smallest positive value, so
    the zeros stay on the chart (at the bottom) and the rest keep their log spacing; else 'linear'."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if not len(positive) or (finite < 0).any(): return 'linear', {}
    if len(positive) == len(finite): return 'log', {}
    if positive.max() / positive.min() >= 10:
        return 'symlog', {'linthresh': 10.0 ** math.floor(math.log10(positive.min())), 'linscale': 0.5}
    return 'linear', {}


def _set_compare_scale(ax, values):
    "Give `ax` the `_compare_scale` of `values`; on 'symlog' the axis starts just under 0 (no negative value to show)."
    scale, kwargs = _compare_scale(values)
    ax.set_yscale(scale, **kwargs)
    if scale == 'symlog': ax.set_ylim(bottom=-0.3 * kwargs['linthresh'])


def _integer_steps(ax):
    "Tick the x axis (steps) at whole numbers only, as many as matplotlib's own ticks."
    ax.xaxis.set_major_locator(MaxNLocator(nbins='auto', steps=[1, 2, 2.5, 5, 10], integer=True))


def _legend_below(ax, bar, handles, **kwargs):
    """A legend of `handles` on `ax`, hung under `ax`'s colour bar `bar`: clear of the cells, of the bar and of its
    tick labels, and of a neighbouring panel's colour bar (where a legend beside the bar would land)."""
    below = offset_copy(bar.ax.transAxes, fig=ax.figure, y=-14, units='points')
    return ax.legend(handles=handles, loc='upper left', bbox_to_anchor=(0, 0), bbox_transform=below, fontsize=8,
                     frameon=False, borderaxespad=0, handlelength=1.2, **kwargs)


_EDGE_MARKS = (('nan', 'NaN (top edge)', 1, '^'), ('inf', 'Inf (top edge)', 1, '^'),
               ('-inf', '-Inf (bottom edge)', 0, 'v'), ('zero', 'zero (bottom edge)', 0, 'v'))


def _edge_points(values, log):
    "Masks of the points that a line cannot show: NaN, +Inf, -Inf and, on a log scale, zeros (and below), by kind."
    masks = {'nan': np.isnan(values), 'inf': np.isposinf(values), '-inf': np.isneginf(values)}
    masks['zero'] = np.isfinite(values) & (values <= 0) if log else np.zeros(len(values), bool)
    return masks


def _mark_edges(ax, x, masks, colors):
    """Mark at the top or bottom edge of `ax` the points of each kind in `masks` (see `_edge_points`) at steps `x`:
    a triangle in `SPECIAL_COLORS` edged in the colour of the point's curve (`colors`, one per point), named once
    in the legend. The marks are placed in axes coordinates: they do not move the y limits."""
    edge = blended_transform_factory(ax.transData, ax.transAxes)
    for kind, label, y, marker in _EDGE_MARKS:
        mask = masks[kind]
        if not mask.any(): continue
        ax.scatter(x[mask], np.full(mask.sum(), y), transform=edge, marker=marker, s=36, clip_on=False, zorder=3,
                   facecolor=SPECIAL_COLORS[kind.lstrip('-')], edgecolors=colors[mask], linewidths=1, label=label)


# --- heatmap --------------------------------------------------------------------------------
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


# --- magnitude histogram ------------------------------------------------------------------
def _hist_frame(record):
    "The histogram rows of `record` (a GradRecord or its `.hist`) and the weight of each row (see `hist_table`)."
    if isinstance(record, GradRecord):
        if not record.has_hist: raise ValueError("`record` has no histograms: record with `GradStats(hist=True)`")
        hist = record.hist
        if hist.empty: raise ValueError("`record` is empty: no step was recorded")
        numel = record.layers.set_index('name').loc[hist['layer'].astype(str), 'numel'].to_numpy(float)
    elif isinstance(record, pd.DataFrame):
        hist = record
        missing = [c for c in ('step', 'layer', *HIST_BINS) if c not in hist]
        if missing: raise ValueError(f"`record` must be a GradRecord or its `.hist`; the DataFrame lacks {missing[:3]}")
        if hist.empty: raise ValueError("`record` is empty: no step was recorded")
        numel = hist['numel'].to_numpy(float) if 'numel' in hist else None
    else:
        raise TypeError(f"`record` must be a GradRecord or its `.hist` DataFrame, got {type(record).__name__}")
    _check_one_rank(hist, 'record', 'hist')
    if numel is None: return hist, np.ones(len(hist))
    counted = hist[list(HIST_BINS)].sum(axis=1).to_numpy(float)
    with np.errstate(divide='ignore', invalid='ignore'):
        return hist, np.where(counted > 0, numel / counted, 0.0)


def hist_table(record, layer=None) -> pd.DataFrame:
    """The bins x step table that `magnitude_hist` draws: the fraction of gradient elements in each bin.

    For the whole model (`layer=None`) each layer's counts (of at most `hist_sample` elements) are scaled to its
    number of elements, so the fractions are those of all the model's gradient elements; the number comes from
    the record's layer table, or from the `numel` column of a `.hist` DataFrame (one without it: the counts are
    added unscaled)."""
    if layer is not None and not isinstance(layer, str):
        raise TypeError(f"`layer` must be None or a layer name (str), got {type(layer).__name__} {layer!r}")
    hist, weight = _hist_frame(record)
    if layer is not None:
        names = list(pd.unique(hist['layer'].astype(str)))
        _select_layers(names, [layer], 'layer')
        keep = (hist['layer'].astype(str) == layer).to_numpy()
        hist, weight = hist[keep], weight[keep]
    counts = hist[list(HIST_BINS)].to_numpy(float) * weight[:, None]
    per_step = pd.DataFrame(counts, columns=list(HIST_BINS)).groupby(hist['step'].to_numpy()).sum()
    fractions = per_step.div(per_step.sum(axis=1).replace(0, np.nan), axis=0)
    return fractions.T


def magnitude_hist(record, layer=None, ax=None, cmap='magma'):
    """How gradient elements spread over orders of magnitude at each step: a log10 |g| bins x iteration heatmap.

    Rows are the bins of `HIST_BINS` (zero at the bottom, NaN at the top), colour the fraction of
    elements (log scale, matplotlib colormap `cmap`), for the whole model or one `layer`; bins without elements
    are grey. The line |g| = 1 is marked, which answers at a glance whether gradients are ever larger than 1;
    the legend (under the colour bar) names it and the grey. Returns the Axes."""
    table = hist_table(record, layer)
    values = table.to_numpy()
    ax = _new_ax(ax, (10, 5))
    x0, x1 = _step_extent(table.columns)
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(max(positive.min(), 1e-6), 1) if len(positive) else Normalize(0, 1)
    image = ax.imshow(np.ma.masked_where(~(values > 0), values), aspect='auto', interpolation='nearest',
                      origin='lower', cmap=cmap, norm=norm, extent=(x0, x1, -0.5, len(HIST_BINS) - 0.5))
    ax.set_facecolor(_EMPTY_COLOR)
    one = HIST_BINS.index('1e0')
    line = ax.axhline(one - 0.5, color='#00c0ff', lw=1.5, ls='--', label='|g| = 1')
    ticks = _hist_ticks(one)
    ax.set_yticks(ticks); ax.set_yticklabels([HIST_BINS[i] for i in ticks], fontsize=7)
    ax.set_ylabel('|g| bin (decade: 1e-3 holds 0.001 <= |g| < 0.01)')
    ax.set_xlabel('step')
    if _uneven(table.columns): _label_steps(ax, list(table.columns))
    else: _integer_steps(ax)
    ax.set_title('gradient magnitudes' + (f' of {layer}' if layer else ' (whole model)'))
    bar = ax.figure.colorbar(image, ax=ax)
    bar.set_label('fraction of elements (log scale)')
    _legend_below(ax, bar, [line, Patch(facecolor=_EMPTY_COLOR, edgecolor='#555555', lw=0.5, label='no elements')])
    return ax


def _hist_ticks(one):
    """The bins of `HIST_BINS` named on the axis: every bin that is not a decade (zero, tiny, huge, Inf, NaN), and,
    when there are many, every second decade counted from 1e0 (bin `one`), less those next to a named bin."""
    special = [i for i, b in enumerate(HIST_BINS) if not b.startswith('1e')]
    decades = [i for i, b in enumerate(HIST_BINS) if b.startswith('1e')]
    if len(HIST_BINS) > 16:
        decades = [i for i in decades if (i - one) % 2 == 0 and (i == one or all(abs(i - j) > 1 for j in special))]
    return sorted(special + decades)


# --- gradient flow --------------------------------------------------------------------------
def flow_table(record, step=None, steps=None) -> pd.DataFrame:
    """Per layer (input to output): `grad_rms` averaged and `grad_max` maximised over the chosen steps.

    `step` picks one recorded step, `steps` a `(first, last)` window (inclusive); neither: all steps. A NaN step
    is left out of a layer's mean and max (its bar shows the finite steps; `health`'s nonfinite check reports
    NaN and Inf), while an Inf makes them Inf."""
    df, order = _frame(record)
    if step is not None and steps is not None: raise ValueError("give `step` or `steps`, not both")
    if step is not None:
        if step not in set(df['step']): raise ValueError(f"`step` {step!r} was not recorded; recorded: {df['step'].min()}-{df['step'].max()}")
        df = df[df['step'] == step]
    elif steps is not None:
        if not (isinstance(steps, (tuple, list)) and len(steps) == 2):
            raise ValueError(f"`steps` must be a (first, last) pair, got {steps!r}")
        if any(isinstance(s, bool) or not isinstance(s, numbers.Real) for s in steps):
            raise TypeError(f"`steps` must be a (first, last) pair of step numbers, got {steps!r}")
        df = df[(df['step'] >= steps[0]) & (df['step'] <= steps[1])]
        if df.empty: raise ValueError(f"no recorded step in `steps` {tuple(steps)}")
    grouped = df.groupby(df['layer'].astype(str))
    table = pd.DataFrame({'grad_rms': grouped['grad_rms'].mean(), 'grad_max': grouped['grad_max'].max()})
    return table.reindex([l for l in order if l in table.index])


def gradient_flow(record, step=None, steps=None, ax=None, weights_only=False):
    """Mean (root mean square) and max |gradient| per layer from input to output, on a log scale.

    For one `step`, a `(first, last)` window of `steps`, or all steps: vanishing with depth shows
    as values falling towards the input (left). A layer whose gradient is Inf (at any chosen step) or NaN
    (at all of them) has no bar to draw: it is marked by a full-height band in `SPECIAL_COLORS['inf']` or
    `SPECIAL_COLORS['nan']`, named in the legend (right of the axes, clear of the bars). `weights_only` leaves
    out the biases and other non-weights (`is_weight`). A new figure is at most 16 inches wide, however many
    layers (their names are then thinned). Returns the Axes."""
    table = flow_table(record, step, steps)
    if weights_only:
        table = table[[is_weight(i) for i in table.index]]
        if table.empty: raise ValueError("`weights_only=True` left no layer: no parameter is named 'weight...'")
    ax = _new_ax(ax, (min(16, max(6, 0.3 * len(table) + 3)), 4))
    x = np.arange(len(table))
    values = table.to_numpy(float)
    height = table.mask(np.isinf(values))  # an infinite bar breaks matplotlib's limits: the band below shows it
    ax.bar(x, height['grad_max'], color='#9ecae1', label='max |g|')
    ax.bar(x, height['grad_rms'], color='#08519c', width=0.5, label='rms |g|')
    infinite = np.isinf(values).any(axis=1)
    for kind, label, marked in (('inf', 'Inf', infinite), ('nan', 'NaN', np.isnan(values).any(axis=1) & ~infinite)):
        for n, i in enumerate(np.flatnonzero(marked)):
            ax.axvspan(i - 0.4, i + 0.4, color=SPECIAL_COLORS[kind], alpha=0.6, label=label if n == 0 else '_nolegend_')
    if (np.isfinite(values) & (values > 0)).any(): ax.set_yscale('log')
    _layer_ticks(ax, list(table.index), 'x')
    ax.set_xlabel('layer (input at left)'); ax.set_ylabel('|gradient|')
    which = f'step {step}' if step is not None else f'steps {steps[0]}-{steps[1]}' if steps is not None else 'all steps'
    ax.set_title(f'gradient flow ({which})')
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return ax


# --- curves ---------------------------------------------------------------------------------
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


# --- comparing runs -------------------------------------------------------------------------
def total_norm(records, labels=None, ax=None, bands=(0.1, 10.0, 100.0)):
    """The total gradient norm per step of one or more runs on one log axis, with the textbook's bands shaded (`bands`:
    healthy from, warning from, critical from; None: no bands): `records` a list of GradRecords or of their `.steps`
    DataFrames, `labels` their names. NaN/Inf steps are marked at the top of the axes. Returns the Axes."""
    if isinstance(records, (GradRecord, pd.DataFrame)) or not isinstance(records, (list, tuple)) or not records:
        raise TypeError("`records` must be a non-empty list of GradRecords (or their .steps DataFrames)")
    tables = []
    for i, rec in enumerate(records):
        steps = rec.steps if isinstance(rec, GradRecord) else rec
        if not isinstance(steps, pd.DataFrame) or not {'step', 'grad_norm'} <= set(steps.columns):
            raise TypeError(f"`records[{i}]` must be a GradRecord or a .steps DataFrame (with step and grad_norm)")
        _check_one_rank(steps, f'records[{i}]', 'steps')
        tables.append(steps)
    labels = [f'run {i}' for i in range(len(tables))] if labels is None else list(labels)
    if len(labels) != len(tables) or not all(isinstance(l, str) for l in labels):
        raise ValueError(f"`labels` must be {len(tables)} strings, one per record, got {labels!r}")
    if bands is not None and (len(bands) != 3 or not all(isinstance(b, (int, float)) and b > 0 for b in bands)
                              or not bands[0] <= bands[1] <= bands[2]):
        raise ValueError(f"`bands` must be None or three increasing positive numbers, got {bands!r}")
    ax = _new_ax(ax, (9, 3.5))
    ax.set_yscale('log')
    for steps, label in zip(tables, labels):
        norms = steps['grad_norm'].to_numpy(float)
        line, = ax.plot(steps['step'].to_numpy(), np.where(np.isfinite(norms) & (norms > 0), norms, np.nan), label=label)
        bad = ~np.isfinite(norms)
        if bad.any():
            ax.plot(steps['step'].to_numpy()[bad], np.ones(bad.sum()), linestyle='none', marker='v', color=line.get_color(),
                    transform=ax.get_xaxis_transform(), clip_on=False, label=f'{label}: NaN/Inf')
    if bands is not None:
        low, warn, crit = bands
        top = max(ax.get_ylim()[1], crit * 10)
        ax.axhspan(low, warn, color='#2ca02c', alpha=0.08, label=f'healthy {low:g}-{warn:g}')
        ax.axhspan(crit, top, color='#d62728', alpha=0.06, label=f'over {crit:g}')
    ax.set_xlabel('step'); ax.set_ylabel('total gradient norm')
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1), borderaxespad=0)
    _integer_steps(ax)
    return ax


def compare_table(records, metric='grad_rms', labels=None, weights_only=True):
    """Per run and aligned layer, the mean and the median over iterations of `metric`.

    Layers are aligned by name when the runs share names, else by position from the input (`'layer 0'`, ...;
    a shorter run's missing layers are NaN). `weights_only` keeps the weights, when every run has some.
    `labels` names the runs (distinct str; default `'run 0'`, `'run 1'`, ...). Returns a DataFrame indexed by the aligned layer with columns (run label, 'mean'|'median')."""
    if isinstance(records, (GradRecord, pd.DataFrame)) or not hasattr(records, '__len__'):
        raise TypeError("`records` must be a list of GradRecords or DataFrames")
    if len(records) < 2: raise ValueError(f"`records` needs two or more runs to compare, got {len(records)}")
    if labels is not None and (not isinstance(labels, (list, tuple)) or not all(isinstance(l, str) for l in labels)):
        raise TypeError(f"`labels` must be None or a list of names (str), got {labels!r}")
    labels = [f'run {i}' for i in range(len(records))] if labels is None else list(labels)
    if len(labels) != len(records): raise ValueError(f"`labels` has {len(labels)} names for {len(records)} records")
    if len(set(labels)) != len(labels): raise ValueError(f"`labels` must be distinct, got {labels}")
    runs = [_frame(rec, 'records') for rec in records]
    for df, _ in runs: _check_metric(df, metric)
    orders = [order for _, order in runs]
    weights = [[l for l in order if is_weight(l)] for order in orders]
    # all runs or none: one run's weights must not line up with another's biases
    if weights_only and all(weights): orders = weights
    frames = [df.groupby(df['layer'].astype(str))[metric].agg(['mean', 'median']).reindex(order)
              for (df, _), order in zip(runs, orders)]
    if not all(list(f.index) == list(frames[0].index) for f in frames):
        positions = [f'layer {i}' for i in range(max(len(f) for f in frames))]
        frames = [f.set_axis(positions[:len(f)]).reindex(positions) for f in frames]
    return pd.concat(frames, axis=1, keys=labels)


def compare(records, metric='grad_rms', labels=None, weights_only=True):
    """Two or more runs side by side, layers aligned: mean and median over iterations of `metric` per layer,
    and the median across all of a run's layers at each step (`weights_only`, for the first two panels, keeps
    the weights when every run has some). The y axes are logarithmic when the values are positive; when some are
    exact zeros (dead layers) and the rest span a decade or more, 'symlog': linear near 0, so the zeros stay in
    view at the bottom, logarithmic above (NaN, a shallower run's missing layers, is left out of the choice).
    Returns the Figure (three panels); see `compare_table`."""
    table = compare_table(records, metric, labels, weights_only)
    labels = list(table.columns.get_level_values(0).unique())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(table))
    for label in labels:
        axes[0].plot(x, table[(label, 'mean')].to_numpy(float), marker='o', label=label)
        axes[1].plot(x, table[(label, 'median')].to_numpy(float), marker='o', label=label)
    for a, what in zip(axes[:2], ('mean', 'median')):
        _layer_ticks(a, list(table.index), 'x')
        a.set_title(f'{what} of {metric} over iterations'); a.set_xlabel('layer (input at left)')
        _set_compare_scale(a, table.xs(what, axis=1, level=1).to_numpy(float))
        a.legend(fontsize=8)
    for label, rec in zip(labels, records):
        df, _ = _frame(rec, 'records')
        per_step = df.groupby('step')[metric].median()
        axes[2].plot(per_step.index.to_numpy(), per_step.to_numpy(float), label=label)
    axes[2].set_title(f'median of {metric} across all layers'); axes[2].set_xlabel('step')
    _set_compare_scale(axes[2], np.concatenate([line.get_ydata() for line in axes[2].lines]).astype(float))
    _integer_steps(axes[2])
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- the same functions as methods of the record ------------------------------------------
for _func in (heatmap, magnitude_hist, gradient_flow, layer_curves, update_ratio):
    record_method(_func, f'plot_{_func.__name__}')
