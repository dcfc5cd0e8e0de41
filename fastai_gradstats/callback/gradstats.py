"""`GradStats`, the fastai callback: the only module that knows fastai's training loop.

At `before_step` it hands the final gradients of one optimizer step to
`fastai_gradstats.stats.LayerStats`, copies the one result tensor to the host and appends
it to a `GradRecord`, which stays at `learn.grad_stats` after the callback is removed.
Routine steps wait, up to `MAX_WAITING` of them, and are assembled together (numpy calls cost
most when made once per step); the record adds them before anything reads it.

`GradStats` holds the events and their order; what they do is in the rooms beside it: `learner` (the model as
GradStats reads it), `steps` (a recorded step, the waiting steps, the update norms), `alerts`, `fit_scope`.
"""
from __future__ import annotations

import numpy as np
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastcore.basics import store_attr

from ..checks import _positive_int, check_zero_tol
from ..record import GradRecord
from ..thresholds import Thresholds
from .fit_scope import _FitScope
from .learner import _rank, _read_model, _training_setup
from .steps import _flush_update, _measure_update, _record_step

__all__ = ['GradStats']


_BOOKKEEPING = frozenset({'step_count', 'stopped_at', '_active', '_params', '_module_of', '_plan', '_plan_key', '_plan_devices', '_plan_index', '_plan_params',
                           '_placed', '_in_step', '_stopping', '_recorded_step', '_pending_update', '_kept_params', '_alerted', '_waiting',
                           '_not_routine', '_checks_to_skip', '_phase_key', '_phase_start', '_phase_noted'})


class GradStats(_FitScope, Callback):
    "Record per-layer gradient statistics of every `every`-th optimizer step into `learn.grad_stats` (unscaled, before `GradientClip`)"
    # Gradients are final between MixedPrecision (order 10), which unscales them in its
    # before_step, and GradientClip (order 11), which clips them: record the true, pre-clip values.
    # GradientAccumulation (order 6) cancels the batches that do not step before we run.
    order = MixedPrecision.order + 0.5
    run_valid = False
    _kept_params = None  # a callback pickled (`learn.export`) by a version without it reads this
    _waiting = None      # nor these
    _not_routine = _checks_to_skip = 0
    _placed = frozenset()
    _in_step = None    # (epoch, iter) of the batch whose step began (before_step) and has not ended (after_step)
    _phase_key, _phase_start = None, ()  # the tensors of the phase the alerts measure growth in, and its first norms
    _phase_noted = None  # the last step whose norm `_phase_start` took
    _stopping = False  # stop_on_critical raised CancelFitException in this fit

    def __init__(self,
        every:int=1,             # Record optimizer steps 0, `every`, 2*`every`, ... (steps count from 0 across fits)
        zero_tol:float=0.0,      # A gradient element with |g| <= `zero_tol` counts as zero in `zero_frac` and `dead_frac`
        hist:bool=False,         # Also record each layer's log10 |g| histogram (`learn.grad_stats.hist`); adds about half the cost of the rest
        hist_sample:int|None=2048, # Count the histogram of a larger tensor on this many fixed, spread elements; None: all
        update_ratio:bool=False, # Also record ||w_after - w_before|| / ||w_before|| per layer (keeps a copy of the weights)
        alerts:bool=True,        # Warn once when NaN/Inf gradients or an explosion first appear (`GradientAlert`)
        stop_on_critical:bool=False, # Stop training at that step, before the optimizer applies it, keeping the record
        thresholds:Thresholds|None=None, # The diagnosis' thresholds, for the live alerts and the record's `health()`; default `Thresholds()`
        keep_last:int|None=None, # Bound memory: keep every step of the last `keep_last` recorded, thin older ones geometrically
        all_ranks:bool=False,    # Under data parallel, record on every rank (tagged `rank`), not only on rank 0
    ):
        every, hist_sample = _positive_int(every, 'every'), _positive_int(hist_sample, 'hist_sample', allow_none=True)
        check_zero_tol(zero_tol)
        if thresholds is None: thresholds = Thresholds()
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"`thresholds` must be a fastai_gradstats.Thresholds, got {type(thresholds).__name__}")
        for name, flag in (('hist', hist), ('update_ratio', update_ratio), ('alerts', alerts),
                           ('stop_on_critical', stop_on_critical), ('all_ranks', all_ranks)):
            if not isinstance(flag, bool): raise TypeError(f"`{name}` must be True or False, got {flag!r}")
        store_attr()
        hist_dtype = None if not hist else np.uint16 if hist_sample is not None and hist_sample < 2**16 else np.int64
        self.record = GradRecord(args={'every': int(every), 'zero_tol': float(zero_tol), 'hist': hist,
                                       'hist_sample': hist_sample, 'update_ratio': update_ratio, 'keep_last': keep_last},
                                 extra_columns=('update_norm',) if update_ratio else (), hist_dtype=hist_dtype,
                                 keep_last=keep_last, every=int(every))
        self.record.thresholds = thresholds  # the diagnosis of the record uses them too
        self.step_count, self._active, self._params, self._plan, self._recorded_step = 0, False, None, None, False
        self._plan_params, self._plan_devices = None, None
        self._kept_params, self._alerted, self.stopped_at = None, set(), None
        self._pending_update, self._waiting = None, None
        self._not_routine, self._checks_to_skip = 0, 0  # steps in a row `_may_wait` found not routine; checks to skip

    def __getstate__(self):
        "Pickled (`learn.export`) with the steps it holds added to its record first, so the copies are not pickled twice."
        self.record._add_waiting()
        return {**self.__dict__, '_waiting': None}

    def __setattr__(self, name, value):
        # fastai's Callback.__setattr__ looks every name up on the Learner to warn about shadowing, a chain of
        # failing __getattr__ calls (about 10 us): the per-step bookkeeping below, which shadows nothing, skips it
        if name in _BOOKKEEPING: object.__setattr__(self, name, value)
        else: super().__setattr__(name, value)

    @property
    def name(self):
        # `learn.grad_stats` is the record, which outlives the callback; the callback is `learn.grad_stats_cb`.
        return 'grad_stats_cb'

    # --- events --------------------------------------------------------------------------
    def before_fit(self):
        super().before_fit()
        self.learn.grad_stats = self.record  # there from the start (a fit sets up at its first `before_train`)
        if not self.record.depth_of():  # the layer table, even for a fit that never trains (`fit(0)`)
            _read_model(self)
            self._params = self._module_of = None

    def start_fit(self):
        self._active = not hasattr(self.learn, 'lr_finder')  # lr_find trains a throwaway copy
        if not self._active: return
        # Under DDP the gradients at before_step are already averaged over ranks: rank 0 alone has the
        # global statistics, at no extra collective; other ranks record only when asked to.
        rank = _rank()
        if rank is not None: self.record.rank = rank
        if rank and not self.all_ranks:
            self.learn.grad_stats, self._active = self.record, False
            return
        self.record._add_waiting()  # steps an interrupted fit left waiting
        # the last fit was interrupted (no after_fit) inside a step, maybe inside the optimizer's: its update stays unknown
        if self._in_step is not None: self._end_unfinished_step(measure_update=False)
        del self._fits[:-1]  # fits that never ended (interrupted): only this one is open now
        self.learn.grad_stats = self.record
        _read_model(self)
        self._plan, self._plan_key, self._plan_params, self._placed = None, None, None, frozenset()
        self.record.args.update(_training_setup(self.learn))

    def before_step(self):
        if not self._active: return
        if self._in_step is not None: self._end_unfinished_step()
        self._in_step = (self.learn.epoch, self.learn.iter)  # this batch's step, until its after_step
        _record_step(self, skipped=False)

    def after_cancel_step(self):
        if not self._active: return
        batch = (self.learn.epoch, self.learn.iter)
        if self._in_step is not None and self._in_step != batch: self._end_unfinished_step()  # an earlier batch's
        if self._in_step is None:  # cancelled before our before_step (the fp16 grad scaler's skip): record it now
            self._in_step = batch
            _record_step(self, skipped=True)
        elif self._recorded_step: self.record.mark_skipped()

    def after_step(self):
        if not self._active: return
        if self._kept_params is not None: _measure_update(self)
        self.step_count += 1
        self._recorded_step, self._in_step = False, None

    def end_fit(self):
        if self._active and self._in_step is not None:
            if self._stopping:  # stop_on_critical stopped before this step was applied
                self.record.mark_skipped()
                self.learn.opt.zero_grad()  # fastai leaves the gradients: the next fit must not add onto them
            self._end_unfinished_step()
        self._stopping = False
        _flush_update(self)
        self._params, self._plan, self._plan_params, self._module_of, self._active = None, None, None, None, False
        self._kept_params = None
        if self._waiting is not None: self._waiting.plan = self._waiting.layout = None  # its array serves the next fit

    def _end_unfinished_step(self, measure_update=True):
        """The step of an earlier batch got no `after_step`: a CancelBatch/Epoch/Train/FitException from another
        callback (in a later one's `before_step`, or an earlier one's `after_step`) or an interrupted fit. It counts
        as a step; if recorded, it stays as recorded, not flagged skipped: whether the optimizer applied it cannot be
        told from here. With `update_ratio` its update norm is measured now, as far as the weights moved (0 if the
        step was not applied); after an interrupted fit (`measure_update=False`) it stays NaN."""
        if measure_update and self._kept_params is not None: _measure_update(self)
        self.step_count += 1
        self._in_step, self._recorded_step, self._kept_params = None, False, None
