"""Runs side by side: the total gradient norm of several runs on one axis with the textbook's bands (`total_norm`), and
a metric per aligned layer (`compare`, its table `compare_table`)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..record import GradRecord
from .axes import _integer_steps, _layer_ticks, _new_ax
from .frames import _check_metric, _check_one_rank, _frame, is_weight

__all__ = ['compare', 'compare_table', 'total_norm']


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
