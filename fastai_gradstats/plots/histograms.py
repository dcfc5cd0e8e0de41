"""The magnitude histogram over iterations: the fraction of gradient elements in each log10 |g| bin at each step, for the
whole model or one layer (`magnitude_hist`), and the table it draws (`hist_table`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.patches import Patch

from ..record import GradRecord
from ..stats import HIST_BINS
from .axes import _integer_steps, _label_steps, _legend_below, _new_ax, _step_extent, _uneven
from .frames import _check_one_rank, _select_layers

__all__ = ['hist_table', 'magnitude_hist']


_EMPTY_COLOR = '#8c8c8c'  # histogram bins without elements: a mid grey, far from both ends of magma


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
