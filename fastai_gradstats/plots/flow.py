"""Gradient flow: the mean and max |gradient| per layer from input to output (`gradient_flow`), and its table
(`flow_table`)."""
from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from .axes import SPECIAL_COLORS, _layer_ticks, _new_ax
from .frames import _frame, is_weight

__all__ = ['flow_table', 'gradient_flow']


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
