"""The axis helpers every figure shares: a new Axes or the caller's, layer names on an axis (thinned past
`MAX_LAYER_LABELS`), step axes (evenly spaced or not), the choice of a log scale, legends under a colour bar, and the
marks at an edge for the points a line cannot show (NaN, ±Inf, zeros on a log scale, in `SPECIAL_COLORS`)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory, offset_copy

__all__ = ['MAX_LAYER_LABELS', 'SPECIAL_COLORS']


SPECIAL_COLORS = {'zero': '#000000', 'nan': '#ff00ff', 'inf': '#ff8c00'}
"Colours of heatmap cells that a colour scale cannot show: exact zeros on a log scale, NaN, ±Inf."


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
