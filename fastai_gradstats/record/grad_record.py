"""`GradRecord`: per-layer gradient statistics of a training run, one entry per recorded optimizer step.

The record knows nothing of fastai. It is its arrays and what they describe (`__init__`), with its methods in the rooms
of this package, one mixin each: `filling` (layers and steps in), `pending` (steps and values still to come),
`thinning` (bounded memory), `tables` (the DataFrames out), `saved` (`save`). `record_method` lets the modules above
(plots, health) add their functions as its methods, so the record imports none of them.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from ..checks import _positive_int
from ..stats import HIST_BINS, METRICS
from .arrays import _Growable, _ranges, _step_squares
from .columns import COUNT_COLUMNS, EXTRA_COLUMNS
from .filling import _Filling
from .pending import _Pending
from .saved import _Saving
from .tables import _Tables
from .thinning import _Thinning

__all__ = ['GradRecord', 'record_method']


class GradRecord(_Filling, _Pending, _Thinning, _Tables, _Saving):
    """Per-layer gradient statistics of a training run, one entry per recorded optimizer step.

    `GradStats` fills it while training and leaves it at `learn.grad_stats`; `load` reads a
    saved one back. Read it through:

    - `df`: tidy DataFrame, one row per (recorded step, parameter tensor), ordered by step and
      then from input to output; columns `step`, `epoch`, `layer`, the statistics of
      `fastai_gradstats.stats.METRICS`, `grad_param_ratio`, `grad_rms` (root mean square of the
      gradient's elements), `n_nan`, `n_inf`, and `update_norm`, `update_ratio` when they were recorded
      (and first a `rank` column in a merge of several ranks);
    - `steps`: one row per recorded step: `step`, `epoch`, `lr`, `loss`, `grad_norm` (the L2 norm
      over all recorded parameters), `skipped` (the optimizer did not apply this step), `kept_every`
      (the stride at which steps around this one are kept: `every`, or more where `keep_last` thinned
      old steps), and first a `rank` column in a merge of several ranks (`merge`);
    - `layers`: one row per parameter tensor: `name`, `module`, `shape`, `numel`, `depth`, `group`
      (the optimizer's parameter group, -1 when unknown), `requires_grad` (in the last fit; None when unknown);
    - `lrs`: one row per (recorded step, optimizer parameter group): `step`, `group`, `lr`, so discriminative
      learning rates show (`steps['lr']` is the last group's);
    - `stopped_steps`: the steps at which `GradStats(stop_on_critical=True)` stopped training (recorded, flagged
      `skipped`, never applied; the diagnosis reads their gradients), a list, empty when it never stopped;
    - `thresholds`: the `Thresholds` the run was recorded with (`GradStats(thresholds=...)`; None: the defaults),
      which `health`, `summary` and the report use unless given others; `save` and `load` keep them.

    Arguments: `layers`, the layer table (dicts with the `layers` columns, or set later with `set_layers`);
    `args`, a dict of the callback's arguments (saved with the run); `extra_columns`, value columns after
    `METRICS` (only `'update_norm'`); `hist_dtype`, an integer numpy dtype (`GradStats` uses uint16 or int64)
    that makes the record keep magnitude histograms of that dtype; `keep_last`, keep every step of the last
    `keep_last` recorded and thin older ones geometrically (None: keep all); `every`, the stride at which
    the steps are recorded (the `kept_every` of steps that were not thinned).
    """
    thresholds = None  # the `Thresholds` the run was recorded with (None: the defaults); older records lack their own
    _deferred = None  # records pickled before `set_last_later` existed have no such attribute of their own
    stopped_steps = ()  # nor before `stopped_steps`
    _waiting = None   # nor before `hold` existed
    _pending_last = False

    def __init__(self, layers=(), args=None, extra_columns=(), hist_dtype=None, keep_last=None, every=1):
        self.keep_last, self.every = _positive_int(keep_last, 'keep_last', allow_none=True), _positive_int(every, 'every')
        self.rank = None        # the process rank under data parallel (None: one process)
        self.multi_rank = False # a merge of several ranks: `df` and `steps` get a `rank` column
        self.stopped_steps = []  # where `GradStats(stop_on_critical=True)` stopped training (recorded, not applied)
        self._unthinned = 0
        self._layers = []
        self._index = {}
        if args is not None and not isinstance(args, Mapping):
            raise TypeError(f"`args` must be a dict of the callback's arguments or None, got {type(args).__name__} {args!r}")
        self.args = dict(args or {})
        if hist_dtype is not None:   # histograms hold counts of elements
            try: kind = np.dtype(hist_dtype).kind
            except (TypeError, ValueError): kind = None
            if kind is None or kind not in 'iu':
                raise TypeError(f"`hist_dtype` must be None or an integer numpy dtype (uint16, int64, ...), got {hist_dtype!r}")
            hist_dtype = np.dtype(hist_dtype)
        unknown = set(extra_columns) - set(EXTRA_COLUMNS)
        if unknown: raise ValueError(f"`extra_columns` has unknown names {sorted(unknown)}; known: {list(EXTRA_COLUMNS)}")
        self.value_columns = list(METRICS) + [c for c in EXTRA_COLUMNS if c in extra_columns]
        self._values = _Growable(np.float32, len(self.value_columns))
        self._hist = None if hist_dtype is None else _Growable(hist_dtype, len(HIST_BINS))
        self._counts = _Growable(np.int64, len(COUNT_COLUMNS))
        self._row_layer = _Growable(np.int32)
        self._step_cols = {'step': _Growable(np.int64), 'epoch': _Growable(np.int32), 'lr': _Growable(np.float64),
                           'loss': _Growable(np.float32), 'skipped': _Growable(np.bool_), 'n_rows': _Growable(np.int64),
                           'kept_every': _Growable(np.int64), 'rank': _Growable(np.int32), 'n_groups': _Growable(np.int32),
                           'grad_sq': _Growable(np.float64)}  # each step's sum of squared layer norms: `steps['grad_norm']`
        self._lrs = _Growable(np.float64)  # every parameter group's learning rate, `n_groups` of them per step
        self._cache = {}
        self.pending_last = False
        self._deferred = None  # (column, fetch): where the pending values are, fetched when something reads them
        self._waiting = None   # what adds the steps recorded but not added yet (`hold`)
        self.set_layers(layers)

    def __getstate__(self):
        "Pickling (`learn.export`, `copy.deepcopy`) takes the steps waiting and the values left to fetch with it, added first."
        self.fetch_pending()
        return {**self.__dict__, '_waiting': None}

    def __setstate__(self, state):
        if 'pending_last' in state: state['_pending_last'] = state.pop('pending_last')  # pickled by an older version
        self.__dict__.update(state)
        if '_lrs' not in state:  # pickled before the groups' learning rates were kept: none known for its steps
            self._lrs = _Growable(np.float64)
            self._step_cols['n_groups'] = _Growable(np.int32)
            self._step_cols['n_groups'].extend(np.zeros(len(self._step_cols['step']), np.int32))
        if 'grad_sq' not in self._step_cols:  # pickled before the steps' squared norms were kept as they arrived
            self._step_cols['grad_sq'] = _Growable(np.float64)
            self._step_cols['grad_sq'].extend(_step_squares(self._values.view, self._step_cols['n_rows'].view))

    # --- reading -------------------------------------------------------------------------
    def __len__(self):
        "The number of recorded steps kept (after `keep_last` thinned old ones), as in `steps`."
        self._thin_if_due()
        return len(self._step_cols['step'])

    def _n_steps(self) -> int:
        "The number of steps held now, steps waiting added, without thinning (for the per-step paths)."
        self._add_waiting()
        return len(self._step_cols['step'])

    def _subset(self, positions) -> 'GradRecord':
        """A new record of the steps at `positions` (indices into `steps`, increasing), with the same layers, arguments,
        thresholds and stops: a sample of a long run that reads like the run (its `steps`, `df`, `lrs`)."""
        self._thin_if_due()
        positions = np.asarray(positions, np.int64)
        out = GradRecord(self._layers, self.args, self.value_columns[len(METRICS):],
                         None if self._hist is None else self._hist.data.dtype, every=self.every)
        out.rank, out.multi_rank, out.thresholds = self.rank, self.multi_rank, self.thresholds
        out.stopped_steps = list(self.stopped_steps)
        n_rows = self._step_cols['n_rows'].view
        starts = np.cumsum(n_rows) - n_rows
        rows = _ranges(starts[positions], n_rows[positions])
        columns = {k: self._step_cols[k].view[positions] for k in ('step', 'epoch', 'lr', 'loss', 'skipped', 'kept_every', 'rank')}
        groups = self._step_cols['n_groups'].view
        group_starts = np.cumsum(groups) - groups
        columns['lrs'] = [self._lrs.view[group_starts[p]:group_starts[p] + groups[p]] for p in positions]
        out._extend(columns, n_rows[positions], self._row_layer.view[rows], self._values.view[rows], self._counts.view[rows],
                    None if self._hist is None else self._hist.view[rows])
        return out


def record_method(func, name=None):
    """Make `func(record, ...)` available as the method `name` (default: its own name) of `GradRecord`.

    The modules above the record (plots, health) add their functions this way, so the record
    itself imports none of them."""
    @functools.wraps(func)  # its signature and docstring: Shift-Tab and help() show them, less the record
    def method(self, *args, **kwargs): return func(self, *args, **kwargs)
    method.__name__ = name or func.__name__
    method.__qualname__ = f'GradRecord.{method.__name__}'
    setattr(GradRecord, method.__name__, method)
    return func
