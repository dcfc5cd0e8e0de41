"""GradStats assembles routine steps up to 16 at a time (`LayerStats._routine`, `GradRecord.hold`).

Nothing may show it: every read of the record sees every recorded step, values equal the float64
reference, steps that `refine` or an alert needs are handled at once and in order, and
`_routine` never lets through a step that `refine` would have fixed.
"""
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from fastai.basics import Callback

import fastai_gradstats.callback as callback_module
import fastai_gradstats.stats as stats_module
from fastai_gradstats import GradStats, GradientAlert, LayerStats, Thresholds

from helpers import (Capture, InjectNonFinite, Repair, assert_record_matches, make_learner, small_dls, tiny_mlp)


class Batches:
    "Counts the batches `GradStats` assembles and the steps in each (wraps `LayerStats._assemble_steps`)."
    def __init__(self, monkeypatch):
        self.sizes, original = [], LayerStats._assemble_steps
        def counted(stats, raws, layout):
            self.sizes.append(len(raws))
            return original(stats, raws, layout)
        monkeypatch.setattr(LayerStats, '_assemble_steps', counted)


# the GPU path (parameter norms in each tensor's first row, graphs) where a device is lent; CI has none
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'))]


def _fit(cbs, epochs=2, n_train=128, bs=16, model=None, lr=0.1, device='cpu'):
    dls = small_dls(n_train=n_train, bs=bs, shuffle=False).to(torch.device(device))
    learn = make_learner(model or tiny_mlp(), dls)
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, lr, cbs=cbs)
    return learn


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('max_waiting', [1, 3, 64])
@pytest.mark.parametrize('kwargs', [{}, {'hist': True, 'update_ratio': True, 'every': 2}])
def test_batched_steps_equal_the_reference_and_the_step_by_step_record(monkeypatch, max_waiting, kwargs, device):
    monkeypatch.setattr(callback_module, 'MAX_WAITING', max_waiting)
    batches = Batches(monkeypatch)
    cap = Capture()
    batched = _fit([GradStats(**kwargs), cap], device=device).grad_stats
    assert_record_matches(batched, cap.captured, steps=range(0, 16, kwargs.get('every', 1)))
    assert max(batches.sizes) == min(max_waiting, len(batched))  # they did wait (all at the end of a fit at most)
    # the same fit with every step assembled as it comes (as before batching): the same record, bit for bit
    monkeypatch.setattr(callback_module.steps, '_may_wait', lambda self, host, layout: False)
    single = _fit([GradStats(**kwargs)], device=device).grad_stats
    assert batched.df.equals(single.df) and batched.steps.equals(single.steps)
    if kwargs.get('hist'): assert batched.hist.equals(single.hist)
    if kwargs.get('update_ratio'): assert batched.df['update_norm'].notna().all()


class Reader(Callback):
    "Reads the record after some batches, as a live display would: every recorded step must be there."
    order = GradStats.order + 0.5
    run_valid = False

    def __init__(self, every): self.every, self.n, self.seen = every, 0, []

    def after_batch(self):
        if not self.training: return
        self.n += 1
        if self.n % self.every: return
        record = self.learn.grad_stats
        self.seen.append((len(record), record.last()['step'], int(record.steps['step'].iloc[-1]), len(record.df)))


def test_reads_while_training_see_every_recorded_step(monkeypatch):
    batches = Batches(monkeypatch)
    cap, reader = Capture(), Reader(every=5)
    learn = _fit([GradStats(update_ratio=True), cap, reader])
    record, n_layers = learn.grad_stats, 4
    assert reader.seen == [(n, n - 1, n - 1, n * n_layers) for n in range(5, 17, 5)]
    assert max(batches.sizes) == 5  # between two reads, the steps waited
    assert_record_matches(record, cap.captured)
    # every update norm arrived, also those of the steps that were last when read
    before = {c['step']: c['params'] for c in cap.captured}
    after = {n: p.detach().double() for n, p in learn.model.named_parameters()}
    df = record.df
    for step in range(16):
        nxt = before.get(step + 1, after)
        for name, p in before[step].items():
            got = df.loc[(df['step'] == step) & (df['layer'].astype(str) == name), 'update_norm'].item()
            np.testing.assert_allclose(got, float((nxt[name] - p).norm()), rtol=1e-4, err_msg=f'{name} step {step}')


def test_a_step_refine_needs_is_handled_at_once_after_the_steps_waiting(monkeypatch):
    "NaN/Inf at step 5: steps 0-4 waited, step 5 is assembled, refined and alerted at once; order and values hold."
    batches = Batches(monkeypatch)
    cap = Capture()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        record = _fit([GradStats(), InjectNonFinite(at=[5]), cap, Repair()]).grad_stats
    alerts = [w for w in caught if issubclass(w.category, GradientAlert)]
    assert len(alerts) == 1 and 'at step 5' in str(alerts[0].message)
    assert batches.sizes[:2] == [5, 1]  # the five routine steps first, then step 5 on its own
    assert record.steps['step'].tolist() == list(range(16))
    at5 = record.df[record.df['step'] == 5]
    counts = at5.set_index(at5['layer'].astype(str))[['n_nan', 'n_inf']]
    assert counts.loc['0.weight'].tolist() == [3, 0] and counts.loc['0.bias'].tolist() == [0, 2]
    assert record.df.loc[record.df['step'] != 5, ['n_nan', 'n_inf']].eq(0).all().all()
    assert_record_matches(record, cap.captured)


def _critical(limit):
    "Thresholds under which the first total norm above `limit` is an explosion (growth_factor barely above 1)."
    return Thresholds(total_norm_low=limit / 100, total_norm_warning=limit / 10, total_norm_critical=limit,
                      growth_factor=1.0 + 1e-9)


def test_stop_on_critical_keeps_the_steps_that_waited(monkeypatch):
    "The first step whose total norm passes the threshold stops the fit at once; the routine steps before it waited."
    norms = _fit([GradStats()], epochs=1, lr=1.0).grad_stats.steps['grad_norm'].to_numpy()
    # the first step after step 2 whose total norm exceeds every one before it; the threshold just below it
    stop = next(i for i in range(3, len(norms)) if norms[i] > norms[:i].max())
    limit = float(norms[stop] + norms[:stop].max()) / 2
    batches = Batches(monkeypatch)
    cb = GradStats(stop_on_critical=True, alerts=False, thresholds=_critical(limit))
    record = _fit([cb], epochs=1, lr=1.0).grad_stats
    assert cb.stopped_at == stop and batches.sizes[0] >= 2
    assert record.steps['step'].tolist() == list(range(stop + 1))
    assert record.steps['skipped'].tolist() == [False] * stop + [True]
    np.testing.assert_allclose(record.steps['grad_norm'], norms[:stop + 1], rtol=1e-6)


def test_a_new_plan_adds_the_steps_waiting_first(monkeypatch):
    "Freezing a layer mid-fit changes which tensors are recorded: the steps of the old plan go in first, in order."
    batches = Batches(monkeypatch)

    class FreezeAt(Callback):
        order = GradStats.order + 0.2
        def after_step(self):
            if self.learn.train_iter == 6: self.learn.model[0].requires_grad_(False)

    cap = Capture()
    record = _fit([GradStats(), cap, FreezeAt()], epochs=1).grad_stats
    assert batches.sizes == [7, 1]  # steps 0-6 waited with all four tensors, steps 7 on with two
    per_step = record.df.groupby('step')['layer'].count()
    assert per_step.tolist() == [4] * 7 + [2]
    assert_record_matches(record, cap.captured)


class PickleAt(Callback):
    "At the 6th training batch, pickles the record (as `learn.export` would) or takes the callback's pickled state."
    order = GradStats.order + 0.5
    def __init__(self, what): self.what = what
    def after_batch(self):
        if not (self.training and self.learn.train_iter == 6): return
        cb = self.learn.grad_stats_cb
        self.waiting = len(cb._waiting.steps)
        if self.what == 'record': self.blob = pickle.dumps(self.learn.grad_stats)
        else: self.state = cb.__getstate__()
        self.after = len(cb._waiting.steps)


@pytest.mark.parametrize('what', ['record', 'callback'])
def test_pickling_mid_fit_takes_the_waiting_steps_along(what):
    spy = PickleAt(what)
    learn = _fit([GradStats(), spy], epochs=1)
    assert spy.waiting == 6 and spy.after == 0   # pickling added them to the record first
    if what == 'record':
        copy = pickle.loads(spy.blob)
        assert copy._waiting is None and len(copy) == 6
        assert copy.df.equals(learn.grad_stats.df[learn.grad_stats.df['step'] < 6])
    else: assert spy.state['_waiting'] is None


# --- LayerStats._routine -------------------------------------------------------------------------
def _refined(stats, grads, params):
    "Whether `refine` recomputes anything for these gradients (it calls `_exact_stats` only then)."
    raw = stats.collect(grads, params).numpy().copy()
    values, _ = stats.assemble(raw)
    calls = []
    original = stats_module.exact._exact_stats
    stats_module.exact._exact_stats = lambda *a, **k: calls.append(1) or original(*a, **k)
    try: stats.refine(values, grads, params)
    finally: stats_module.exact._exact_stats = original
    return raw, bool(calls)


SHAPES = [(6, 5), (5,), (3, 2, 2), (1,), (0, 3), (2, 7)]


def _cases():
    "Gradients `refine` must fix, and healthy ones: each (name, grads)."
    g = torch.Generator().manual_seed(0)
    def randn(shape, scale=1.0): return torch.randn(shape, generator=g) * scale
    healthy = [randn(s) for s in SHAPES]
    yield 'healthy', healthy
    yield 'tiny healthy', [t * 1e-12 for t in healthy]
    for name, i, change in [('nan', 0, lambda t: t.index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan))),
                            ('inf', 1, lambda t: t.fill_(math.inf)),
                            ('float32 overflow', 0, lambda t: t.mul_(1e30)),
                            ('underflow', 0, lambda t: t.mul_(1e-30)),
                            ('cancellation', 0, lambda t: t.fill_(3.0).add_(randn(t.shape, 1e-5))),
                            ('constant 1-D', 1, lambda t: t.fill_(-2.5)),
                            ('constant rows', 5, lambda t: t.fill_(0.5))]:
        grads = [t.clone() for t in healthy]
        change(grads[i])
        yield name, grads


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
def test_routine_never_passes_a_step_refine_would_fix(zero_tol):
    params = [torch.randn(s) for s in SHAPES]
    stats = LayerStats(SHAPES, zero_tol=zero_tol)
    seen = {}
    for name, grads in _cases():
        raw, refined = _refined(stats, grads, params)
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # NaN, Inf and overflow pass through without a RuntimeWarning
            routine = stats._routine(raw, stats._last, math.inf)
        seen[name] = (routine, refined)
        assert not (routine and refined), f'{name}: routine, yet refine recomputes it'
    assert seen['healthy'] == (True, False) and seen['tiny healthy'] == (True, False)
    for name in ('nan', 'inf', 'float32 overflow', 'cancellation', 'constant 1-D', 'constant rows'):
        assert seen[name] == (False, True), name
    # elements of 1e-30 are all within a zero_tol of 1e-3: nothing to refine then (routine or not)
    assert seen['underflow'] == ((False, True) if zero_tol == 0 else (seen['underflow'][0], False))


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
@pytest.mark.parametrize('norms_by_rows', [True, False])
def test_a_tiny_parameter_is_not_routine(monkeypatch, norms_by_rows, zero_tol):
    """A parameter whose norm `refine` redoes (above 0, below 1e-18) makes its step not routine; one of zeros does not.
    Also with each parameter's norm in its tensor's first row and 0 in the others, as on CUDA."""
    monkeypatch.setattr(stats_module.layout, '_param_norms_by_rows', lambda device: norms_by_rows)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    stats = LayerStats(SHAPES, zero_tol=zero_tol)
    for name, scale, routine in [('normal', 1.0, True), ('tiny', 1e-22, False), ('zeros', 0.0, True)]:
        params = [torch.randn(s, generator=g) for s in SHAPES]
        params[5] *= scale
        raw, refined = _refined(stats, grads, params)
        assert (stats._routine(raw, stats._last, math.inf), refined) == (routine, not routine), name


class ShrinkParameter(Callback):
    "Scales one parameter down to about 1e-22 at `before_step` of step `at`, before GradStats reads it."
    order = GradStats.order - 0.1
    run_valid = False

    def __init__(self, at): self.at, self.count = at, 0

    def before_step(self):
        if self.count == self.at:
            with torch.no_grad(): dict(self.learn.model.named_parameters())['2.weight'].mul_(1e-21)

    def after_step(self): self.count += 1


@pytest.mark.parametrize('device', DEVICES)
def test_a_step_with_a_tiny_parameter_is_refined_at_once(monkeypatch, device):
    "Its parameter norm matches float64 (float32 squares lose it); the routine steps before it waited and come first."
    batches = Batches(monkeypatch)
    cap = Capture()
    record = _fit([GradStats(), ShrinkParameter(at=5), cap], epochs=1, device=device).grad_stats
    assert batches.sizes[:2] == [5, 1]
    assert_record_matches(record, cap.captured)
    at5 = record.df[(record.df['step'] == 5) & (record.df['layer'].astype(str) == '2.weight')]
    assert 1e-23 < at5['param_norm'].item() < 1e-18


def test_rows_that_prove_nothing_fall_back_to_each_tensors_sums():
    "Rows of one element, or of nearly one value, prove nothing by themselves: the tensor's own sums decide, as refine's would."
    shapes = [(5, 4), (6, 1), (3, 9)]
    stats = LayerStats(shapes)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    def randn(s): return torch.randn(s, generator=g)
    near_constant_rows = randn((3, 1)) + 1e-3 * randn((3, 9))   # each row nearly one value, the rows unlike each other
    cases = {'one-element rows': ([randn(shapes[0]), randn(shapes[1]), randn(shapes[2])], True),
             'near-constant rows': ([randn(shapes[0]), randn(shapes[1]), near_constant_rows], True),
             'near-constant tensor': ([randn(shapes[0]), 5.0 + 1e-6 * randn(shapes[1]), randn(shapes[2])], False)}
    for name, (grads, routine) in cases.items():
        raw, refined = _refined(stats, grads, params)
        layout, n_rows = stats._last, len(stats._last.row_length)
        per_row = bool((np.abs(raw[2 * n_rows:3 * n_rows]) > layout.spread_bound * raw[:n_rows]).any())
        assert per_row, f'{name}: the rows alone should not suffice'
        assert stats._routine(raw, layout, math.inf) == routine and refined == (not routine), name


def test_routine_is_conservative_on_random_gradients():
    "Many random gradients, some near refine's thresholds: whenever refine recomputes, `_routine` said no."
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 6), (6,), (3, 4, 2), (1, 9)]
    stats = LayerStats(shapes)
    params = [torch.randn(s, generator=g) for s in shapes]
    outcomes = set()
    for trial in range(300):
        grads = []
        for s in shapes:
            t = torch.randn(s, generator=g) * 10 ** float(torch.empty(()).uniform_(-25, 3, generator=g))
            mean = float(torch.empty(()).uniform_(-1, 1, generator=g)) * 10 ** float(torch.empty(()).uniform_(-3, 3, generator=g))
            if trial % 3 == 0: t = t + mean * t.abs().max()  # a mean that may dwarf the spread
            if trial % 5 == 0: t[t.abs() < t.abs().median()] = 0
            grads.append(t)
        raw, refined = _refined(stats, grads, params)
        routine = stats._routine(raw, stats._last, math.inf)
        assert not (routine and refined), f'trial {trial}'
        outcomes.add((routine, refined))
    assert {(True, False), (False, True)} <= outcomes  # both kinds of step occurred


def test_routine_keeps_a_margin_below_the_alert_threshold():
    shapes = [(4, 3), (3,)]
    stats = LayerStats(shapes)
    g = torch.Generator().manual_seed(0)
    grads, params = [torch.randn(s, generator=g) for s in shapes], [torch.ones(s) for s in shapes]
    raw = stats.collect(grads, params).numpy().copy()
    total = sum(float(g.double().square().sum()) for g in grads)
    assert stats._routine(raw, stats._last, total * 1.0001)  # within 1e-4 of the threshold: still sure
    assert not stats._routine(raw, stats._last, total * 0.9999)
    assert not stats._routine(raw, stats._last, total * (1 + 1e-7))  # within float32 rounding of it: not sure


def test_after_a_fit_only_the_array_of_copies_is_kept_for_the_next():
    "The plan (work buffers, a copy of the weights) is released with the fit; the array, touched once, serves the next."
    cb = GradStats(update_ratio=True)
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16, shuffle=False))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1, cbs=cb)
    raws = cb._waiting.raws
    assert cb._waiting.plan is None and cb._waiting.layout is None and not cb._waiting.steps
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1, cbs=cb)
    assert cb._waiting.raws is raws and learn.grad_stats.steps['step'].tolist() == list(range(8))
    assert learn.grad_stats.df['update_norm'].notna().all()


def test_a_network_refine_redoes_every_step_skips_most_checks(monkeypatch):
    "Gradients that underflow every step: after 4 failed checks in a row, checks are skipped 1, 2, 4, ... steps; values stay exact."
    calls, original = [], LayerStats._routine
    monkeypatch.setattr(LayerStats, '_routine', lambda self, *a: calls.append(1) or original(self, *a))
    cap = Capture()
    learn = make_learner(tiny_mlp(), small_dls(n_train=512, bs=16, shuffle=False))
    learn.loss_func = lambda out, y: nn.functional.cross_entropy(out, y) * 1e-25  # gradients of ~1e-26
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.0, cbs=[GradStats(), cap])
    assert len(learn.grad_stats) == 32
    assert len(calls) == 4 + 4   # fails at steps 0-3, skips 1, fails, skips 2, fails, skips 4, fails, skips 8, fails, skips 16
    assert_record_matches(learn.grad_stats, cap.captured)


def test_steps_of_a_healthy_run_above_the_textbooks_band_still_wait(monkeypatch):
    """A loss scaled by 1000 puts every total norm far above `total_norm_critical` (100) without growth: no alert fires
    (an explosion is growth within a phase) and the steps wait in batches as those of the unscaled run do (the gate
    read the level: every step went the per-step path). The record equals the step-by-step reference."""
    sizes, batches = {}, Batches(monkeypatch)
    for scale in (1.0, 1000.0):
        cap, before = Capture(), len(batches.sizes)
        learn = make_learner(tiny_mlp(), small_dls(n_train=256, bs=16, shuffle=False))
        learn.loss_func = lambda out, y, s=scale: nn.functional.cross_entropy(out, y) * s
        with warnings.catch_warnings():
            warnings.simplefilter('error', GradientAlert)   # an alert would fail the test
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.0, cbs=[GradStats(), cap])
        sizes[scale] = batches.sizes[before:]
        norms = learn.grad_stats.steps['grad_norm']
        assert scale == 1 or norms.min() > Thresholds().total_norm_critical
        assert_record_matches(learn.grad_stats, cap.captured)
    assert sizes[1000.0] == sizes[1.0] and max(sizes[1.0]) > 1, sizes
