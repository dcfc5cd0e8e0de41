"""`ShowGradStats`: watch what `GradStats` records while a fit runs.

In a notebook it shows one picture, redrawn in place: the total gradient norm per step beside the layer x step
heatmap of `grad_norm`, titled with the worst finding so far (the card's verdict) or 'healthy so far'. The picture is
`live_png`, drawn straight to PNG in a few tens of milliseconds, so redraws cost little. Elsewhere (a terminal, a
script) it prints one line per epoch. It only reads the record, and it skips redraws that would take more than
`max_share` of the fit. `live_figure` draws the same picture as a matplotlib Figure, from a record alone, so a saved
run can be drawn, saved and changed (`ShowGradStats.replay`).
"""
from __future__ import annotations

import importlib
import io
import math
import numbers
import sys
import time
import warnings

import numpy as np
from fastai.callback.core import Callback
from fastcore.basics import store_attr
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator
from matplotlib.transforms import blended_transform_factory

from .callback import GradStats
from .callback.fit_scope import _FitScope
from .live_picture import (_ALERT_NAMES, _STATUS_COLORS, _checked, _heatmap_columns, _plain_number, _size_of,
                           _title, _worst, live_png)
from .plots import SPECIAL_COLORS, heatmap
from .thresholds import Thresholds

__all__ = ['ShowGradStats', 'live_figure']

_FIRST_COST = 0.1     # seconds one draw is assumed to take before the first one is timed
_now = time.perf_counter


# --- the picture as a matplotlib figure (the live view draws `live_png`) ----------------------------
def _decades_only(axis):
    "A log axis with a plain label at each decade and no minor ticks (each tick is a few artists to draw)."
    axis.set_major_formatter(FuncFormatter(_plain_number))
    axis.set_minor_locator(NullLocator())


def _norm_curve(ax, steps, thresholds):
    "The total gradient norm per recorded step, the healthy band shaded, NaN/Inf steps marked at the top edge."
    x, norms = steps['step'].to_numpy(), steps['grad_norm'].to_numpy(float)
    ax.plot(x, norms, color='#1f4e9c', lw=1.2, marker='.' if len(x) < 40 else None, label='total norm')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = norms[np.isfinite(norms)]
    if len(finite) and (finite > 0).all():
        ax.set_yscale('log')
        _decades_only(ax.yaxis)
    low, high = thresholds.total_norm_low, thresholds.total_norm_warning
    ax.axhspan(low, high, color='#2ca02c', alpha=0.12, label=f'textbook: healthy {low:g}-{high:g}')
    if len(finite) and finite.max() > high:  # the textbook's line; the diagnosis reads growth, not the level
        ax.axhline(thresholds.total_norm_critical, color='#d62728', lw=1, ls='--',
                   label=f'textbook: may explode > {thresholds.total_norm_critical:g}')
    bad = ~np.isfinite(norms)
    if bad.any():
        top = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(x[bad], np.ones(bad.sum()), transform=top, marker='v', s=30, clip_on=False, zorder=3,
                   color=SPECIAL_COLORS['nan'], label='NaN/Inf (top edge)')
    epoch = steps['epoch'].to_numpy()
    for start in x[1:][np.diff(epoch) != 0]: ax.axvline(start, color='#999999', lw=0.6, ls=':')
    ax.set_xlabel('step (dotted: a new epoch)')
    ax.set_ylabel('total gradient norm')
    ax.set_title(f'total gradient norm, step {int(x[-1])}', fontsize=9, y=1.01)  # a y: no search for a place
    ax.legend(fontsize=7, loc='upper right', framealpha=0.8)


def live_figure(record, fig=None, alerts=()) -> Figure:
    """The picture `ShowGradStats` shows, for `record` (a GradRecord, live or loaded): the total gradient norm per
    step (log scale when every finite norm is positive, the healthy band of the record's thresholds shaded, NaN/Inf
    steps marked at the top) beside the layer x step heatmap of `grad_norm` (`plots.heatmap`), titled with the worst
    finding of `record.health()` so far (shortened; 'healthy so far' when there is none). Of more than 250 steps, the
    heatmap draws every k-th step back from the last (2 pixels or more each), the curve all of them.

    `alerts` names the kinds of `GradientAlert` raised while training (`'nonfinite'`, `'exploding'`), put first in
    the title. Draws on `fig` (cleared first) when given, else on a new Figure that pyplot does not know of (nothing
    shows it or keeps it open). Returns the Figure: `fig.axes[0]` holds the norm curve (`lines[0]`), `fig.axes[1]`
    the heatmap (`images[0]`). A record without steps gets a figure that says so."""
    steps, alerts = _checked(record, alerts)
    if fig is not None and not isinstance(fig, Figure):
        raise TypeError(f"`fig` must be a matplotlib Figure or None, got {type(fig).__name__}")
    n_layers = record.df['layer'].nunique() if len(steps) else 0
    size = _size_of(n_layers, len(steps))
    if fig is None: fig = Figure(figsize=size, dpi=90)
    else:
        fig.clear()
        fig.set_size_inches(*size)
    if not len(steps):
        fig.text(0.5, 0.5, 'no step recorded yet', ha='center', va='center', fontsize=12, color='#555555')
        return fig
    curve, cells = fig.subplots(1, 2, width_ratios=(1, 1.5))
    _norm_curve(curve, steps, record.thresholds or Thresholds())
    cells_height = size[1] - 1.6   # inches: the figure less the titles and the step axis
    if n_layers:
        heatmap(_columns(record, steps), 'grad_norm', ax=cells, max_labels=max(4, int(cells_height * 72 / 8)))  # 8 pt a name
        bar = cells.images[0].colorbar
        if bar is not None and isinstance(bar.norm, LogNorm): _decades_only(bar.ax.yaxis)
    else:   # steps at which no parameter had a gradient (all frozen)
        cells.text(0.5, 0.5, 'no parameter had a gradient', ha='center', va='center', transform=cells.transAxes)
    cells.set_title('gradient norm per layer (input at top) and step', fontsize=9, y=1.01)
    if len(steps) == 1:   # one step: its number, not the fractions a locator puts around a lone point
        for ax in (curve, cells): ax.set_xticks(steps['step'].to_numpy())
    headline, detail, status = _title(record, alerts)
    top = 1 - 0.32 / size[1]   # inches from the top edge, whatever the figure's height
    fig.suptitle(headline, y=top, va='top', color=_STATUS_COLORS[status], fontsize=11, fontweight='bold')
    if detail: fig.text(0.5, top - 0.24 / size[1], detail, ha='center', va='top', fontsize=8.5, color='#333333')
    fig.subplots_adjust(left=0.08, right=0.95, bottom=0.55 / size[1], top=top - 0.75 / size[1], wspace=0.38)
    return fig


def _columns(record, steps):
    """What the heatmap draws: the record, or of a long one the rows of the steps `_heatmap_columns` picks (every k-th
    back from the last): narrower columns would hardly show, and the table behind the heatmap costs time in proportion
    to its cells."""
    positions = _heatmap_columns(len(steps))
    if len(positions) == len(steps): return record
    df = record.df
    return df[df['step'].isin(steps['step'].to_numpy()[positions])]


def _png(fig) -> bytes:
    "The figure as PNG bytes, rendered by Agg (nothing is shown)."
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    return buffer.getvalue()


# --- where it is shown ---------------------------------------------------------------------------
def _notebook():
    """(IPython's shell, its `display`) when this process is a notebook kernel (Jupyter, VS Code, Colab: an IPython
    shell with a kernel), else None. IPython is never imported here: a process that has not imported it is no kernel."""
    ipython = sys.modules.get('IPython')
    if ipython is None: return None
    try:
        shell = ipython.get_ipython()
        if shell is None or getattr(shell, 'kernel', None) is None: return None
        return shell, importlib.import_module('IPython.display').display
    except Exception:  # an IPython that is broken or half there: the plain line will do
        return None


def _show_once(record, fig, shell, display):
    """Display the live view's picture of `record` now, and give `fig` (its matplotlib Figure) the `_ipython_display_`
    IPython uses to show an object: returned by the cell that displayed it (`ShowGradStats.replay(run)` as its last
    line), it would show twice; in later cells it shows itself."""
    display(_bundle(record), raw=True)
    shown_in = shell.execution_count
    def show():
        if shell.execution_count != shown_in:
            display({'image/png': _png(fig), 'text/plain': f'<ShowGradStats: {fig.get_suptitle()}>'}, raw=True)
    fig._ipython_display_ = show


def _check_seconds(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number of seconds, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0): raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_share(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`max_share` must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not 0 < value <= 1: raise ValueError(f"`max_share` must be in (0, 1] (a share of the fit's time), got {value!r}")
    return float(value)


class ShowGradStats(_FitScope, Callback):
    "Show what `GradStats` records while training: one picture redrawn in place in a notebook, one line per epoch elsewhere"
    order = GradStats.order + 1  # after GradStats has recorded the step, as the exporters
    run_valid = False
    _active = False

    def __init__(self,
        every:float=3.0,       # Redraw at most every this many seconds (in a notebook)
        max_share:float=0.02,  # Skip a redraw while drawing would take more than this share of the time since the fit began (1: no limit)
    ):
        every, max_share = _check_seconds(every, 'every'), _check_share(max_share)
        store_attr()
        self._warned = False

    @staticmethod
    def replay(record) -> Figure:
        """Draw the picture of the end of a fit for `record` (a GradRecord, live or loaded: `fastai_gradstats.load`):
        in a notebook, display it once as the live view shows it (`live_png`), and return it as a matplotlib Figure
        (`live_figure`) to save or change."""
        fig = live_figure(record)
        notebook = _notebook()
        if notebook is not None: _show_once(record, fig, *notebook)
        return fig

    # --- events --------------------------------------------------------------------------
    def start_fit(self):
        recorder = getattr(self.learn, 'grad_stats_cb', None)
        if recorder is None and not self._warned:
            warnings.warn("ShowGradStats shows what GradStats records, and no GradStats is here: train with "
                          "cbs=[GradStats(), ShowGradStats()]", stacklevel=2)
            self._warned = True
        # lr_find trains a throwaway copy; a data-parallel rank where GradStats does not record has nothing to show
        self._active = recorder is not None and recorder._active and not hasattr(self.learn, 'lr_finder')
        if not self._active: return
        notebook = _notebook()
        self._recorder, self._display = recorder, None if notebook is None else notebook[1]
        self._first_step = recorder.step_count   # this fit's steps start here (GradStats counts on across fits)
        self._started = self._last_drawn = _now()
        self._spent, self._cost = 0.0, _FIRST_COST
        self._handle = None
        self._printed = set()   # the epochs of this fit that have their line

    def after_batch(self):
        if self._active and self._display is not None and self._due(): self._safely(self._draw)

    def after_epoch(self):
        if self._active and self._display is None:
            self._safely(self._print_epoch, self.learn.epoch, self.learn.epoch == self.n_epoch - 1)

    def end_fit(self):
        if not self._active: return
        if self._display is not None: self._safely(self._draw)
        elif self.learn.epoch not in self._printed: self._safely(self._print_epoch, self.learn.epoch, True)  # a fit cut short
        self._active, self._handle, self._display, self._recorder = False, None, None, None

    # --- helpers -------------------------------------------------------------------------
    def _due(self) -> bool:
        "Whether to redraw now: `every` seconds after the last draw, if it is `_affordable`."
        return _now() - self._last_drawn >= self.every and self._affordable()

    def _affordable(self) -> bool:
        """Whether one more draw (timed as long as the last one) and the final one keep the time spent drawing within
        `max_share` of the time since the fit began. The final draw is always made: keeping room for it keeps the
        whole within `max_share`, unless the fit is too short for any draw but the final one. `max_share=1`: no limit."""
        if self.max_share >= 1: return True
        return self._spent + 2 * self._cost <= self.max_share * (_now() - self._started)

    def _safely(self, show, *args):
        "Draw or print; a failure ends the live view of this fit with a warning, never the fit nor its record."
        try: show(*args)
        except Exception as error:
            self._active = False
            warnings.warn(f"ShowGradStats stopped showing ({type(error).__name__}: {error}); the fit and its record go on",
                          stacklevel=3)

    def _timed(self, work):
        start = _now()
        try: return work()
        finally:
            self._cost = _now() - start
            self._spent += self._cost
            self._last_drawn = _now()

    def _alerts(self) -> set:
        return set(getattr(self._recorder, '_alerted', ())) & set(_ALERT_NAMES)

    def _draw(self):
        "Draw the record on the kept figure and show it: in place of the last picture of this fit, or as a new output."
        def draw():
            bundle = _bundle(self.learn.grad_stats, self._alerts())
            if self._handle is None: self._handle = self._display(bundle, raw=True, display_id=True)
            else: self._handle.update(bundle, raw=True)
        self._timed(draw)

    def _print_epoch(self, epoch, final):
        "Print this fit's line for `epoch`; the worst finding only when the diagnosis fits `max_share` (always when `final`)."
        self._printed.add(epoch)
        steps = self.learn.grad_stats.steps
        steps = steps[(steps['step'].to_numpy() >= self._first_step) & (steps['epoch'].to_numpy() == epoch)]
        norms = steps['grad_norm'].to_numpy(float)
        finite = norms[np.isfinite(norms)]
        line = f'GradStats epoch {epoch}: {len(steps)} steps'
        if len(finite):
            line += f', total norm {finite.min():.2g}-{finite.max():.2g} (median {np.median(finite):.2g})'
        if len(finite) < len(norms): line += f', {len(norms) - len(finite)} NaN/Inf'
        if len(self.learn.grad_stats) and (final or self._affordable()):
            line += ', worst: ' + self._timed(lambda: _worst_short(self.learn.grad_stats, self._alerts()))
        print(line, flush=True)


def _worst_short(record, alerts) -> str:
    "The worst finding as a few words for the terminal line: 'ok', 'WARNING spikes', 'ALERT NaN/Inf gradients; ...'."
    _, finding, _, _ = _worst(record)
    words = 'ok' if finding == 'healthy so far' else finding
    if alerts: words = 'ALERT ' + ', '.join(_ALERT_NAMES[k] for k in sorted(alerts)) + '; ' + words
    return words


def _bundle(record, alerts=()) -> dict:
    "What IPython displays: the live view's picture of `record` (PNG), and its title as the text a console without images shows."
    title = _title(record, alerts)[0] if len(record) else 'no step recorded yet'
    return {'image/png': live_png(record, alerts), 'text/plain': f'<ShowGradStats: {title}>'}
