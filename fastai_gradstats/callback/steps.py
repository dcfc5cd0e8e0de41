"""What `GradStats` does at a recorded step: the one host copy of the step's reductions (`_to_host`), a routine step
kept waiting with others (`_Waiting`, up to `MAX_WAITING`) and assembled together, the others refined, checked by the
alerts and added to the record at once; then the update norms, measured on the device after the optimizer step and
brought to the host by the next step's copy."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch

from ..stats import LayerStats, _PerDevice
from .alerts import _alert, _alert_limit, _note_phase_start
from .learner import _place_by_depth, _with_grads

__all__ = []


def _to_host(tensor: torch.Tensor) -> np.ndarray:
    "The one device-to-host copy of a recorded step (kept in one place so tests can count it)."
    return tensor.detach().cpu().numpy()


WAITING_BYTES = 2 ** 22
"""Most bytes of host copies `GradStats` keeps before assembling the steps they hold into its record (at most
`MAX_WAITING` steps); a model whose copy is larger than half of this adds every step as it comes."""


class _Waiting:
    """Steps recorded but not added to the record yet: their host copies, all laid out by one `LayerStats` layout,
    side by side in one array, and what the record needs besides (step, epoch, lr; whether a copy carries the
    update norms of the step before it)."""
    def __init__(self, plan, layout, layer_index, width, spare=None):
        from . import MAX_WAITING  # set on the package (`fastai_gradstats.callback.MAX_WAITING = 1`) before a fit
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


def _record_step(cb, skipped):
    """`GradStats`' work at a step (every `every`-th): plan for the tensors that have a gradient (again when they change),
    one host copy of the reductions, then wait (a routine step) or refine, add to the record and alert."""
    if cb.step_count % cb.every: return
    chosen = _with_grads(cb._params)
    params, grads = [p for _, p, _ in chosen], [g for _, _, g in chosen]
    if cb._plan_params is None or len(params) != len(cb._plan_params) or not all(map(operator.is_, params, cb._plan_params)):
        key = tuple(n for n, _, _ in chosen)
        if not cb._placed.issuperset(key):  # parameters training for the first time in this fit: place them by depth
            _place_by_depth(cb, key)
            chosen = _with_grads(cb._params)  # in the new order
            params, grads = [p for _, p, _ in chosen], [g for _, _, g in chosen]
            key = tuple(n for n, _, _ in chosen)
        devices = [p.device for p in params]
        if key != cb._plan_key or devices != cb._plan_devices:
            shapes, settings = [p.shape for p in params], (cb.zero_tol, cb.hist, cb.hist_sample)
            # a model split between devices: one LayerStats (and one host copy) per device
            cb._plan = LayerStats(shapes, *settings) if len(set(devices)) <= 1 else _PerDevice(devices, shapes, *settings)
            cb._plan_index, cb._plan_key, cb._plan_devices = cb.record.layer_index(key), key, devices
            if key != cb._phase_key: cb._phase_key, cb._phase_start = key, []  # other tensors train: a new phase
        cb._plan_params = params
    loss = cb.learn.loss
    # fastai's loss is a TensorBase, whose __torch_function__ would wrap every op after it: use a plain tensor
    loss = torch.full((), torch.nan) if loss is None else loss.as_subclass(torch.Tensor)
    if loss.numel() != 1: loss = loss.detach().float().mean()
    # the last step's update norms (measured on the device at its after_step) ride along in this step's copy
    update, cb._pending_update = cb._pending_update, None
    if update is not None and len(update) != len(params):
        # other parameters have a gradient than at the step before (unfrozen, or first used): its update norms
        # cannot ride along in rows laid out for this step, so they go to it now, with a copy of their own
        cb.record.set_last('update_norm', _to_host(update))
        update = None
    extra = [loss] if update is None else [loss, update]
    # the one copy of this step (lists we built: no argument checks)
    if isinstance(cb._plan, LayerStats) and grads and not skipped:
        host = _to_host(cb._plan._collect(grads, params, extra, cb.update_ratio))
        layout = cb._plan._last
        if _may_wait(cb, host, layout):
            _wait(cb, host, layout, carries_update=update is not None)
            if cb.update_ratio: cb._kept_params = params
            cb._recorded_step = True
            return
        cb.record._add_waiting()  # the steps before this one go first
        values, hist = cb._plan._assemble_steps(host[None], layout)
        values, hist = values[0], None if hist is None else hist[0]
        host_extra = host[layout.extra_at:]
    else: values, hist, host_extra = cb._plan._measure(grads, params, extra, _to_host, keep=cb.update_ratio)
    if update is not None: cb.record.set_last('update_norm', host_extra[1:])
    loss, n = float(host_extra[0]), len(params)
    values, counts = cb._plan.refine(values, grads, params)  # a second copy only on steps that need it
    if cb.update_ratio:
        values = np.concatenate([values, np.full((n, 1), np.nan, np.float32)], axis=1)
        cb._kept_params = params  # the plan kept a copy of them (keep=True above) for `_measure_update`
    cb.record.add_step(cb.step_count, cb.learn.epoch, _group_lrs(cb), loss,
                       cb._plan_index, values, counts, skipped, hist, pending=cb.update_ratio and not skipped)
    cb._recorded_step = True
    if not skipped and (cb.alerts or cb.stop_on_critical): _alert(cb, values, counts)


def _group_lrs(cb) -> list:
    "The learning rate of each of the optimizer's parameter groups, now."
    return [hyper['lr'] for hyper in cb.learn.opt.hypers]


def _may_wait(cb, host, layout) -> bool:
    """Whether this step can wait to be assembled with the next ones: a routine step (`LayerStats._routine`:
    nothing for `refine` to fix, and a total gradient norm surely below the alerts' `_alert_limit`), whose copy is
    small enough to keep a few of. After 4 steps in a row that were not (a network whose gradients underflow
    every step: `refine` must redo them all), the check itself is skipped for 1, 2, 4, ... up to 64 steps,
    which then take the per-step path as the failed ones did."""
    if 2 * len(host) * host.itemsize > WAITING_BYTES: return False
    rows = host[:len(layout.row_length)]  # each row's gradient norm
    _note_phase_start(cb, lambda: math.sqrt(float(np.dot(rows, rows))))
    if cb._checks_to_skip:
        cb._checks_to_skip -= 1
        return False
    # the alerts read this step now, unless its total norm is surely below theirs (growth within the phase, not a level)
    limit = _alert_limit(cb._phase_start, cb.thresholds) ** 2 if cb.alerts or cb.stop_on_critical else math.inf
    if cb._plan._routine(host, layout, limit):
        cb._not_routine = 0
        return True
    cb._not_routine += 1
    if cb._not_routine >= 4: cb._checks_to_skip = min(64, 2 ** (cb._not_routine - 4))
    return False


def _wait(cb, host, layout, carries_update):
    "Keep this step's copy with the others waiting; assemble them all once there are as many as fit."
    waiting = cb._waiting
    if waiting is None or waiting.layout is not layout or waiting.layer_index is not cb._plan_index:
        cb.record._add_waiting()  # laid out otherwise: those go first
        width = layout.extra_at + 1 + len(cb._plan)  # the loss, and the update norms of the step before
        waiting = cb._waiting = _Waiting(cb._plan, layout, cb._plan_index, width, None if waiting is None else waiting.raws)
    if not waiting.steps: cb.record.hold(lambda: _assemble_waiting(cb))
    waiting.add(host, cb.step_count, cb.learn.epoch, _group_lrs(cb), carries_update)
    if waiting.full: cb.record._add_waiting()


def _assemble_waiting(cb):
    """Assemble the steps waiting (one batch of numpy calls) and add them to the record, in order, with the update
    norms each copy carries for the step before it; the record calls this before anything reads it (`hold`)."""
    waiting = cb._waiting
    if waiting is None or not waiting.steps: return
    k, n, layout = len(waiting.steps), len(waiting.plan), waiting.layout
    raws, steps = waiting.raws[:k], waiting.steps
    waiting.steps = []
    values, hist = waiting.plan._assemble_steps(raws, layout)
    if cb.update_ratio:
        values = np.concatenate([values, np.full((k, n, 1), np.nan, np.float32)], axis=2)
        update_at = layout.extra_at + 1
        for j, (*_, carries_update) in enumerate(steps):
            if not carries_update: continue
            if j == 0: cb.record.set_last('update_norm', raws[0, update_at:update_at + n])
            else: values[j - 1, :, -1] = raws[j, update_at:update_at + n]
    columns = {'step': [s[0] for s in steps], 'epoch': [s[1] for s in steps], 'lr': [s[2][-1] for s in steps],
               'lrs': [s[2] for s in steps],
               'loss': raws[:, layout.extra_at], 'skipped': np.zeros(k, bool)}
    cb.record.fetch_pending()  # values still to fetch belong to the step before these (as `add_step` does)
    cb.record._extend(columns, np.full(k, n), np.tile(waiting.layer_index, k), values.reshape(k * n, -1),
                      np.zeros((k * n, 2), np.int64), None if hist is None else hist.reshape(k * n, -1))
    if cb.update_ratio:
        cb.record.pending_last = True  # the last one's update norms come later
        update = cb._pending_update     # ... or are measured already (a read between its after_step and the next step)
        if update is not None: cb.record.set_last_later('update_norm', lambda: _to_host(update))


def _measure_update(cb):
    """||w_after - w_before|| of the step just taken, left on the device: the next recorded step's copy
    brings it into the last recorded step (`df` derives `update_ratio`); when none follows (the end of the
    fit, or one that stops without its last event), the record fetches it when it is read."""
    params, cb._kept_params = cb._kept_params, None
    if not params: return cb.record.set_last('update_norm', [])
    cb._pending_update = update = cb._plan._update_norms(params)
    if cb._waiting is not None and cb._waiting.steps: return  # its step waits: `_assemble_waiting` hands them over
    # fetched only if the record is read before the next recorded step brings them (an interrupted fit)
    cb.record.set_last_later('update_norm', lambda: _to_host(update))


def _flush_update(cb):
    "At the end of a fit: the steps waiting, then the last step's update norms, with a copy of their own (once per fit)."
    cb.record._add_waiting()
    cb._pending_update = None
    cb.record.fetch_pending()
