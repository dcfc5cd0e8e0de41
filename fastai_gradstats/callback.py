"""`GradStats`, the fastai callback: the only module that knows fastai's training loop.

At `before_step` it hands the final gradients of one optimizer step to
`fastai_gradstats.stats.LayerStats`, copies the one result tensor to the host and appends
it to a `GradRecord`, which stays at `learn.grad_stats` after the callback is removed.
Routine steps wait, up to `MAX_WAITING` of them, and are assembled together (numpy calls cost
most when made once per step); the record adds them before anything reads it.
"""
from __future__ import annotations

import math
import operator
import warnings

import numpy as np
import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientClip
from fastcore.basics import store_attr

from .record import GradRecord
from .checks import _positive_int, check_zero_tol
from .stats import METRICS, LayerStats, _PerDevice
from .thresholds import Thresholds

__all__ = ['GradStats', 'GradientAlert', 'input_to_output']


class GradientAlert(UserWarning):
    "Warned (once per kind) when a critical gradient condition first appears while training."


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    "The one device-to-host copy of a recorded step (kept in one place so tests can count it)."
    return tensor.detach().cpu().numpy()


def input_to_output(loss: torch.Tensor, params) -> list:
    """Ids of the `params` that `loss` depends on, ordered from the input to the output of the network.

    Reads the autograd graph behind `loss` (it outlives backward): a parameter's depth is its longest
    distance from the loss, the farthest being the input side. Needs no hook on the model."""
    if not isinstance(loss, torch.Tensor): raise TypeError(f"`loss` must be a tensor, got {type(loss).__name__}")
    if loss.grad_fn is None:
        raise ValueError("`loss` has no autograd graph (its grad_fn is None): pass a loss computed from the parameters "
                         "with gradients enabled")
    root = loss.grad_fn
    post_order, seen, stack = [], {root}, [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded: post_order.append(node); continue
        stack.append((node, True))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child); stack.append((child, False))
    distance = {root: 0}
    for node in reversed(post_order):  # a topological order: every node before the nodes it feeds
        d = distance.get(node, 0)
        for child, _ in node.next_functions:
            if child is not None and distance.get(child, -1) < d + 1: distance[child] = d + 1
    wanted = {id(p) for p in params}
    found = {id(n.variable): d for n, d in distance.items() if hasattr(n, 'variable') and id(n.variable) in wanted}
    return sorted(found, key=lambda pid: -found[pid])


_WRAPPER_ATTRIBUTE = '_orig_mod'  # where `torch.compile`'s OptimizedModule keeps the module it compiled


def _unwrapped(model: nn.Module) -> nn.Module:
    "The user's model inside the wrappers that rename its parameters: DDP's and DataParallel's `module`, `torch.compile`'s."
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)): model = model.module
        elif isinstance(getattr(model, _WRAPPER_ATTRIBUTE, None), nn.Module): model = getattr(model, _WRAPPER_ATTRIBUTE)
        else: return model


def _user_name(name: str) -> str:
    "A parameter's name as the user's model spells it: without the `_orig_mod.` of a submodule `torch.compile`d in place."
    return '.'.join(part for part in name.split('.') if part != _WRAPPER_ATTRIBUTE)


def _rank():
    "This process's rank under torch.distributed, or None outside it."
    if torch.distributed.is_available() and torch.distributed.is_initialized(): return torch.distributed.get_rank()
    return None


def _training_setup(learn) -> dict:
    """What the diagnosis reads of how a fit trains, beside the gradients: the training batch size (a loss summed over
    the batch is that many times a mean's) and the `max_norm` of a `GradientClip` among its callbacks (None: none)."""
    clip = [cb.max_norm for cb in learn.cbs if isinstance(cb, GradientClip)]
    dl = getattr(getattr(learn, 'dls', None), 'train', None)
    return {'batch_size': getattr(dl, 'bs', None), 'gradient_clip': float(clip[0]) if clip else None}


PHASE_START = 3
"The first recorded total norms of a phase (the same tensors training) that the explosion alert measures growth from."


def _explodes(total: float, phase_start: list, t: Thresholds) -> str:
    """Why a step's total norm is an explosion the alerts warn of ('' when it is not), as the diagnosis reads one: above
    `total_norm_critical` and `growth_factor` times the least of the first norms of its phase, or ten times
    `total_norm_critical` from the phase's first step (a level alone is not one: a healthy resnet18 starts above 100)."""
    if not math.isfinite(total) or total <= t.total_norm_critical: return ''
    start = [n for n in phase_start if math.isfinite(n)]
    if start and total > t.growth_factor * min(start):
        return f"{total / min(start):.3g}x the {min(start):.3g} its phase started at, above {t.total_norm_critical:g}"
    if start and start[0] > 10 * t.total_norm_critical:
        return f"huge from the phase's first step, over 10x {t.total_norm_critical:g}"
    return ''


WAITING_BYTES = 2 ** 22
"""Most bytes of host copies `GradStats` keeps before assembling the steps they hold into its record (at most
`MAX_WAITING` steps); a model whose copy is larger than half of this adds every step as it comes."""
MAX_WAITING = 16
"Most recorded steps that wait to be assembled together."
_STRIDED = torch.strided


class _Waiting:
    """Steps recorded but not added to the record yet: their host copies, all laid out by one `LayerStats` layout,
    side by side in one array, and what the record needs besides (step, epoch, lr; whether a copy carries the
    update norms of the step before it)."""
    def __init__(self, plan, layout, layer_index, width, spare=None):
        self.plan, self.layout, self.layer_index = plan, layout, layer_index
        shape = (max(1, min(MAX_WAITING, WAITING_BYTES // (width * layout.host_dtype.itemsize))), width)
        if spare is not None and spare.shape == shape and spare.dtype == layout.host_dtype: self.raws = spare
        else:  # touched once now: its pages faulted in one by one, a step at a time, cost more than the copies
            self.raws = np.empty(shape, layout.host_dtype)
            self.raws.fill(0)
        self.steps = []  # (step, epoch, each parameter group's lr, carries the update norms of the step before)

    @property
    def full(self): return len(self.steps) == len(self.raws)

    def add(self, raw, step, epoch, lrs, carries_update):
        self.raws[len(self.steps), :len(raw)] = raw
        self.steps.append((step, epoch, lrs, carries_update))


class _FitScope:
    """A callback mixin: `start_fit` at the first `before_train` of a fit, `end_fit` at that fit's `after_fit`.

    fastai's `validate`, `get_preds`, `predict` and `Learner.summary` send `before_fit` and `after_fit` too, with
    no `before_train` between, also from inside a running fit (a callback that validates after each epoch): those
    pairs must neither reset nor end what the fit set up. A fit stopped by an exception other than fastai's
    cancellations (KeyboardInterrupt) never sends `after_fit`: the next fit starts afresh all the same."""
    _fits = None  # per `before_fit` not yet closed by its `after_fit`: whether its fit started (`start_fit` ran)

    def before_fit(self):
        if self._fits is None: object.__setattr__(self, '_fits', [])
        self._fits.append(False)

    def before_train(self):
        fits = self._fits
        if fits and not fits[-1]:
            fits[-1] = True
            self.start_fit()

    def after_fit(self):
        if self._fits and self._fits.pop(): self.end_fit()

    def start_fit(self): pass
    def end_fit(self): pass


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
            self._read_model()
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
        self._read_model()
        self._plan, self._plan_key, self._plan_params, self._placed = None, None, None, frozenset()
        self.record.args.update(_training_setup(self.learn))

    def before_step(self):
        if not self._active: return
        if self._in_step is not None: self._end_unfinished_step()
        self._in_step = (self.learn.epoch, self.learn.iter)  # this batch's step, until its after_step
        self._record(skipped=False)

    def after_cancel_step(self):
        if not self._active: return
        batch = (self.learn.epoch, self.learn.iter)
        if self._in_step is not None and self._in_step != batch: self._end_unfinished_step()  # an earlier batch's
        if self._in_step is None:  # cancelled before our before_step (the fp16 grad scaler's skip): record it now
            self._in_step = batch
            self._record(skipped=True)
        elif self._recorded_step: self.record.mark_skipped()

    def after_step(self):
        if not self._active: return
        if self._kept_params is not None: self._measure_update()
        self.step_count += 1
        self._recorded_step, self._in_step = False, None

    def end_fit(self):
        if self._active and self._in_step is not None:
            if self._stopping:  # stop_on_critical stopped before this step was applied
                self.record.mark_skipped()
                self.learn.opt.zero_grad()  # fastai leaves the gradients: the next fit must not add onto them
            self._end_unfinished_step()
        self._stopping = False
        self._flush_update()
        self._params, self._plan, self._plan_params, self._module_of, self._active = None, None, None, None, False
        self._kept_params = None
        if self._waiting is not None: self._waiting.plan = self._waiting.layout = None  # its array serves the next fit

    # --- helpers -------------------------------------------------------------------------
    def _read_model(self):
        "The model's parameters by name, each one's module, and the layer table in the record."
        model = _unwrapped(self.learn.model)
        self._params = [(_user_name(n), p) for n, p in model.named_parameters()]
        self._module_of = {}
        for mod_name, module in model.named_modules():
            for p_name, _ in module.named_parameters(recurse=False):
                self._module_of[_user_name(f'{mod_name}.{p_name}' if mod_name else p_name)] = module
        self._describe_layers(order=None)

    def _with_grads(self) -> list:
        """(name, parameter, gradient) of the parameters with a gradient this step (frozen ones may keep a stale one),
        in depth order; each `.grad` read once. A sparse gradient (`nn.Embedding(sparse=True)`) is measured dense."""
        return [(n, p, g if g.layout is _STRIDED else g.to_dense())
                for n, p in self._params if (g := p.grad) is not None and p.requires_grad]

    def _place_by_depth(self, key):
        """Read the depth of every parameter from this step's autograd graph (the loss outlives backward): at the first
        recorded step of a fit, and again when parameters first get a gradient later in it (gradual unfreezing, a
        branch used late), since frozen parameters are not in the graph."""
        loss = getattr(self.learn, 'loss_grad', None)
        if isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            self._describe_layers(input_to_output(loss, [p for _, p in self._params]))
        self._placed = self._placed | set(key)  # also when there is no graph to read: try once per parameter

    def _end_unfinished_step(self, measure_update=True):
        """The step of an earlier batch got no `after_step`: a CancelBatch/Epoch/Train/FitException from another
        callback (in a later one's `before_step`, or an earlier one's `after_step`) or an interrupted fit. It counts
        as a step; if recorded, it stays as recorded, not flagged skipped: whether the optimizer applied it cannot be
        told from here. With `update_ratio` its update norm is measured now, as far as the weights moved (0 if the
        step was not applied); after an interrupted fit (`measure_update=False`) it stays NaN."""
        if measure_update and self._kept_params is not None: self._measure_update()
        self.step_count += 1
        self._in_step, self._recorded_step, self._kept_params = None, False, None

    def _describe_layers(self, order):
        """Describe every parameter; `depth` runs from input to output: from `order` (parameter ids, input first)
        where known; without an `order`, the depth the record already knows (from an earlier fit); else the
        registration order of `model.named_parameters()`."""
        named_order = {n: i for i, (n, _) in enumerate(self._params)}
        if order is not None:
            rank = {pid: i for i, pid in enumerate(order)}
            by_depth = sorted(self._params, key=lambda item: (rank.get(id(item[1]), len(rank)), named_order[item[0]]))
        else:
            known = self.record.depth_of()
            by_depth = sorted(self._params, key=lambda item: (known.get(item[0], math.inf), named_order[item[0]]))
        self._params = by_depth
        opt = getattr(self.learn, 'opt', None)
        groups = getattr(opt, 'param_lists', None) or [g['params'] for g in getattr(opt, 'param_groups', [])]
        group_of = {id(p): i for i, group in enumerate(groups) for p in group}
        self.record.set_layers([{'name': n, 'module': type(self._module_of[n]).__name__, 'shape': tuple(p.shape),
                                 'numel': p.numel(), 'depth': d, 'group': group_of.get(id(p), -1),
                                 'requires_grad': p.requires_grad} for d, (n, p) in enumerate(by_depth)])
        self._plan_key, self._plan_params = None, None

    def _record(self, skipped):
        if self.step_count % self.every: return
        chosen = self._with_grads()
        params, grads = [p for _, p, _ in chosen], [g for _, _, g in chosen]
        if self._plan_params is None or len(params) != len(self._plan_params) or not all(map(operator.is_, params, self._plan_params)):
            key = tuple(n for n, _, _ in chosen)
            if not self._placed.issuperset(key):  # parameters training for the first time in this fit: place them by depth
                self._place_by_depth(key)
                chosen = self._with_grads()  # in the new order
                params, grads = [p for _, p, _ in chosen], [g for _, _, g in chosen]
                key = tuple(n for n, _, _ in chosen)
            devices = [p.device for p in params]
            if key != self._plan_key or devices != self._plan_devices:
                shapes, settings = [p.shape for p in params], (self.zero_tol, self.hist, self.hist_sample)
                # a model split between devices: one LayerStats (and one host copy) per device
                self._plan = LayerStats(shapes, *settings) if len(set(devices)) <= 1 else _PerDevice(devices, shapes, *settings)
                self._plan_index, self._plan_key, self._plan_devices = self.record.layer_index(key), key, devices
                if key != self._phase_key: self._phase_key, self._phase_start = key, []  # other tensors train: a new phase
            self._plan_params = params
        loss = self.learn.loss
        # fastai's loss is a TensorBase, whose __torch_function__ would wrap every op after it: use a plain tensor
        loss = torch.full((), torch.nan) if loss is None else loss.as_subclass(torch.Tensor)
        if loss.numel() != 1: loss = loss.detach().float().mean()
        # the last step's update norms (measured on the device at its after_step) ride along in this step's copy
        update, self._pending_update = self._pending_update, None
        if update is not None and len(update) != len(params):
            # other parameters have a gradient than at the step before (unfrozen, or first used): its update norms
            # cannot ride along in rows laid out for this step, so they go to it now, with a copy of their own
            self.record.set_last('update_norm', _to_host(update))
            update = None
        extra = [loss] if update is None else [loss, update]
        # the one copy of this step (lists we built: no argument checks)
        if isinstance(self._plan, LayerStats) and grads and not skipped:
            host = _to_host(self._plan._collect(grads, params, extra, self.update_ratio))
            layout = self._plan._last
            if self._may_wait(host, layout):
                self._wait(host, layout, carries_update=update is not None)
                if self.update_ratio: self._kept_params = params
                self._recorded_step = True
                return
            self.record._add_waiting()  # the steps before this one go first
            values, hist = self._plan._assemble_steps(host[None], layout)
            values, hist = values[0], None if hist is None else hist[0]
            host_extra = host[layout.extra_at:]
        else: values, hist, host_extra = self._plan._measure(grads, params, extra, _to_host, keep=self.update_ratio)
        if update is not None: self.record.set_last('update_norm', host_extra[1:])
        loss, n = float(host_extra[0]), len(params)
        values, counts = self._plan.refine(values, grads, params)  # a second copy only on steps that need it
        if self.update_ratio:
            values = np.concatenate([values, np.full((n, 1), np.nan, np.float32)], axis=1)
            self._kept_params = params  # the plan kept a copy of them (keep=True above) for `_measure_update`
        self.record.add_step(self.step_count, self.learn.epoch, self._group_lrs(), loss,
                             self._plan_index, values, counts, skipped, hist, pending=self.update_ratio and not skipped)
        self._recorded_step = True
        if not skipped and (self.alerts or self.stop_on_critical): self._alert(values, counts)

    def _note_phase_start(self, total):
        "Keep this step's total norm (`total()`) among the first `PHASE_START` of its phase, once per step."
        if len(self._phase_start) < PHASE_START and self._phase_noted != self.step_count:
            self._phase_start.append(total())
            self._phase_noted = self.step_count

    def _group_lrs(self) -> list:
        "The learning rate of each of the optimizer's parameter groups, now."
        return [hyper['lr'] for hyper in self.learn.opt.hypers]

    def _may_wait(self, host, layout) -> bool:
        """Whether this step can wait to be assembled with the next ones: a routine step (`LayerStats._routine`:
        nothing for `refine` to fix, and a total gradient norm surely below the alert threshold), whose copy is
        small enough to keep a few of. After 4 steps in a row that were not (a network whose gradients underflow
        every step: `refine` must redo them all), the check itself is skipped for 1, 2, 4, ... up to 64 steps,
        which then take the per-step path as the failed ones did."""
        if 2 * len(host) * host.itemsize > WAITING_BYTES: return False
        rows = host[:len(layout.row_length)]  # each row's gradient norm
        self._note_phase_start(lambda: math.sqrt(float(np.dot(rows, rows))))
        if self._checks_to_skip:
            self._checks_to_skip -= 1
            return False
        limit = self.thresholds.total_norm_critical ** 2 if self.alerts or self.stop_on_critical else math.inf
        if self._plan._routine(host, layout, limit):
            self._not_routine = 0
            return True
        self._not_routine += 1
        if self._not_routine >= 4: self._checks_to_skip = min(64, 2 ** (self._not_routine - 4))
        return False

    def _wait(self, host, layout, carries_update):
        "Keep this step's copy with the others waiting; assemble them all once there are as many as fit."
        waiting = self._waiting
        if waiting is None or waiting.layout is not layout or waiting.layer_index is not self._plan_index:
            self.record._add_waiting()  # laid out otherwise: those go first
            width = layout.extra_at + 1 + len(self._plan)  # the loss, and the update norms of the step before
            waiting = self._waiting = _Waiting(self._plan, layout, self._plan_index, width, None if waiting is None else waiting.raws)
        if not waiting.steps: self.record.hold(self._assemble_waiting)
        waiting.add(host, self.step_count, self.learn.epoch, self._group_lrs(), carries_update)
        if waiting.full: self.record._add_waiting()

    def _assemble_waiting(self):
        """Assemble the steps waiting (one batch of numpy calls) and add them to the record, in order, with the update
        norms each copy carries for the step before it; the record calls this before anything reads it (`hold`)."""
        waiting = self._waiting
        if waiting is None or not waiting.steps: return
        k, n, layout = len(waiting.steps), len(waiting.plan), waiting.layout
        raws, steps = waiting.raws[:k], waiting.steps
        waiting.steps = []
        values, hist = waiting.plan._assemble_steps(raws, layout)
        if self.update_ratio:
            values = np.concatenate([values, np.full((k, n, 1), np.nan, np.float32)], axis=2)
            update_at = layout.extra_at + 1
            for j, (*_, carries_update) in enumerate(steps):
                if not carries_update: continue
                if j == 0: self.record.set_last('update_norm', raws[0, update_at:update_at + n])
                else: values[j - 1, :, -1] = raws[j, update_at:update_at + n]
        columns = {'step': [s[0] for s in steps], 'epoch': [s[1] for s in steps], 'lr': [s[2][-1] for s in steps],
                   'lrs': [s[2] for s in steps],
                   'loss': raws[:, layout.extra_at], 'skipped': np.zeros(k, bool)}
        self.record.fetch_pending()  # values still to fetch belong to the step before these (as `add_step` does)
        self.record._extend(columns, np.full(k, n), np.tile(waiting.layer_index, k), values.reshape(k * n, -1),
                            np.zeros((k * n, 2), np.int64), None if hist is None else hist.reshape(k * n, -1))
        if self.update_ratio:
            self.record.pending_last = True  # the last one's update norms come later
            update = self._pending_update     # ... or are measured already (a read between its after_step and the next step)
            if update is not None: self.record.set_last_later('update_norm', lambda: _to_host(update))

    def _alert(self, values, counts):
        """Warn once per kind when a critical condition first appears (NaN/Inf gradients, or an explosion, see
        `_explodes`); stop before the optimizer step if asked."""
        names = self._plan_key
        self._note_phase_start(lambda: math.sqrt(np.square(values[:, METRICS.index('grad_norm')], dtype=np.float64).sum()))
        problems = []
        if counts.any():
            bad_rows = np.flatnonzero(counts.sum(1) > 0)
            problems.append(('nonfinite', f"NaN/Inf gradients at step {self.step_count}, nearest the output in "
                             f"{names[bad_rows[-1]]} ({int(counts[:, 0].sum())} NaN, {int(counts[:, 1].sum())} Inf)"))
        norms = values[:, METRICS.index('grad_norm')]
        total = math.sqrt(np.square(norms, dtype=np.float64).sum())  # float64: squares of large float32 norms overflow
        exploding = _explodes(total, self._phase_start, self.thresholds)
        if exploding:
            problems.append(('exploding', f"total gradient norm {total:.3g} at step {self.step_count} ({exploding}), "
                             f"largest in {names[int(np.argmax(norms))]}"))
        if not problems: return
        for kind, message in problems:
            if self.alerts and kind not in self._alerted:
                self._alerted.add(kind)
                warnings.warn(f"GradStats: {message}" + (': stopping before this step is applied' if self.stop_on_critical else ''),
                              GradientAlert, stacklevel=2)
        if self.stop_on_critical:
            self.stopped_at = self.step_count
            self.record.stopped_steps = [*self.record.stopped_steps, self.step_count]  # a new list: older pickles hold a tuple
            self._stopping = True
            raise CancelFitException()

    def _measure_update(self):
        """||w_after - w_before|| of the step just taken, left on the device: the next recorded step's copy
        brings it into the last recorded step (`df` derives `update_ratio`); when none follows (the end of the
        fit, or one that stops without its last event), the record fetches it when it is read."""
        params, self._kept_params = self._kept_params, None
        if not params: return self.record.set_last('update_norm', [])
        self._pending_update = update = self._plan._update_norms(params)
        if self._waiting is not None and self._waiting.steps: return  # its step waits: `_assemble_waiting` hands them over
        # fetched only if the record is read before the next recorded step brings them (an interrupted fit)
        self.record.set_last_later('update_norm', lambda: _to_host(update))

    def _flush_update(self):
        "At the end of a fit: the steps waiting, then the last step's update norms, with a copy of their own (once per fit)."
        self.record._add_waiting()
        self._pending_update = None
        self.record.fetch_pending()
