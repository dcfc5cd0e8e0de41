"""`GradStats` on real fastai `Learner` fits: every recorded column against a float64 computation from
gradients captured at the same step, and each behaviour of issue 3, item 3, as its own test."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from fastai.basics import Adam, Callback, CancelFitException, load_learner, params, set_seed
from fastai.callback.all import GradientAccumulation, GradientClip  # also adds fit_one_cycle, fine_tune, lr_find

from fastai_gradstats import HIST_BINS, GradientAlert, GradRecord, GradStats, input_to_output

from helpers import (CPUMixedPrecision, Capture, InjectNonFinite, OverflowAt, Repair, assert_record_matches, dead_channel_cnn,
                     dead_unit_mlp, expected_layers, make_learner, quiet, reference_stats, small_dls, tiny_mlp)


def total_norm(grads: dict, names) -> float:
    return float(np.sqrt(sum(float((grads[n] ** 2).sum()) for n in names)))


# --- every column equals an independent float64 computation -------------------------------------
@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
def test_every_column_matches_float64_reference_fit_one_cycle(zero_tol):
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), opt_func=Adam)
    cap = Capture()
    learn.fit_one_cycle(2, 1e-2, cbs=[GradStats(zero_tol=zero_tol), cap])
    assert len(cap.captured) == 8
    assert len({c['lr'] for c in cap.captured}) > 1  # the schedule moves the lr, so `lr` is really checked
    assert_record_matches(learn.grad_stats, cap.captured, zero_tol)
    assert learn.grad_stats.steps['epoch'].tolist() == [0] * 4 + [1] * 4


@pytest.mark.parametrize('model_fn, layer, n_units, n_dead', [(dead_unit_mlp, '0.weight', 16, 6),
                                                              (dead_channel_cnn, '1.weight', 4, 1)])
def test_known_dead_units_are_recorded(model_fn, layer, n_units, n_dead):
    learn = make_learner(model_fn(), small_dls(n_train=48, bs=16))
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(), cap])
    assert_record_matches(learn.grad_stats, cap.captured)
    df = learn.grad_stats.df
    for c in cap.captured:
        g = c['grads'][layer]
        assert (g[:n_dead] == 0).all()  # the units built dead got exactly zero gradient
        dead = df[(df.step == c['step']) & (df.layer == layer)]['dead_frac'].item()
        assert dead >= n_dead / n_units
        assert dead == pytest.approx(float((g.abs().reshape(n_units, -1).amax(1) == 0).double().mean()), abs=1e-7)


@pytest.mark.parametrize('zero_tol', [0.0, 1e-3])
def test_injected_nan_and_inf_are_recorded_as_they_are(zero_tol):
    learn = make_learner(dead_unit_mlp(), small_dls(n_train=64, bs=16))
    cap = Capture()
    with pytest.warns(GradientAlert, match='NaN/Inf'):
        learn.fit(1, 0.1, cbs=[GradStats(zero_tol=zero_tol), cap, InjectNonFinite(at={1, 3}), Repair()])
    assert_record_matches(learn.grad_stats, cap.captured, zero_tol)
    df = learn.grad_stats.df.set_index(['step', 'layer'])
    for s in (1, 3):
        assert df.loc[(s, '0.weight'), 'n_nan'] == 3 and df.loc[(s, '0.weight'), 'n_inf'] == 0
        assert df.loc[(s, '0.bias'), 'n_nan'] == 0 and df.loc[(s, '0.bias'), 'n_inf'] == 2
        assert df.loc[(s, '2.weight'), 'n_nan'] == 1 and df.loc[(s, '2.weight'), 'n_inf'] == 1
        assert np.isnan(df.loc[(s, '0.weight'), 'grad_norm']) and np.isinf(df.loc[(s, '0.bias'), 'grad_norm'])
        assert np.isnan(learn.grad_stats.steps.set_index('step').loc[s, 'grad_norm'])
    for s in (0, 2):
        assert (df.loc[s, ['n_nan', 'n_inf']] == 0).all().all()
        assert np.isfinite(df.loc[s, 'grad_norm']).all()


# --- ordering: pre-clip, after unscaling ---------------------------------------------------------
def test_records_gradients_before_gradient_clip():
    learn = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16))
    pre, post = Capture(), Capture(order=GradientClip.order + 0.5)
    learn.fit(1, 0.1, cbs=[GradStats(), pre, GradientClip(max_norm=1e-3), post])
    assert_record_matches(learn.grad_stats, pre.captured)
    steps = learn.grad_stats.steps
    for c_pre, c_post, recorded in zip(pre.captured, post.captured, steps['grad_norm']):
        names = expected_layers(c_pre)
        assert total_norm(c_post['grads'], names) == pytest.approx(1e-3, rel=1e-3)  # clipping did happen
        assert total_norm(c_pre['grads'], names) > 10 * 1e-3
        assert recorded == pytest.approx(total_norm(c_pre['grads'], names), rel=1e-5)


def test_records_unscaled_gradients_under_mixed_precision():
    learn = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16))
    scaled = Capture(order=CPUMixedPrecision.order - 0.1)  # before MixedPrecision.before_step unscales
    unscaled, clipped = Capture(), Capture(order=GradientClip.order + 0.5)
    learn.fit(1, 0.1, cbs=[CPUMixedPrecision(init_scale=2. ** 10, bf16=True), GradStats(), scaled, unscaled,
                           GradientClip(max_norm=1e-3), clipped])
    assert len(unscaled.captured) == 3 and not any(c['skipped'] for c in unscaled.captured)
    assert_record_matches(learn.grad_stats, unscaled.captured)
    for s, u, c in zip(scaled.captured, unscaled.captured, clipped.captured):
        for n in expected_layers(u):  # the scaler really scaled by 2**10, and GradStats saw the unscaled values
            torch.testing.assert_close(s['grads'][n] / 2. ** 10, u['grads'][n], rtol=1e-6, atol=0)
        names = expected_layers(u)
        assert total_norm(c['grads'], names) == pytest.approx(1e-3, rel=1e-3)
    recorded = learn.grad_stats.steps['grad_norm'].to_numpy()
    np.testing.assert_allclose(recorded, [total_norm(u['grads'], expected_layers(u)) for u in unscaled.captured], rtol=1e-5)


# --- GradientAccumulation --------------------------------------------------------------------------
class Batches(Callback):
    "Keeps every training batch, and the weights at every optimizer step (it runs after GradientAccumulation)."
    order, run_valid = GradientAccumulation.order + 0.5, False

    def __init__(self): self.batches, self.weights_at_step = [], []
    def before_batch(self): self.batches.append((self.learn.xb[0].clone(), self.learn.yb[0].clone()))
    def before_step(self):
        self.weights_at_step.append({n: p.detach().clone() for n, p in self.learn.model.named_parameters()})


def test_gradient_accumulation_records_one_accumulated_gradient_per_step():
    bs, n_acc = 16, 32
    learn = make_learner(tiny_mlp(), small_dls(n_train=128, bs=bs))  # 8 batches, 4 optimizer steps
    cap, batches = Capture(), Batches()
    learn.fit(1, 0.1, cbs=[GradStats(), cap, batches, GradientAccumulation(n_acc=n_acc)])
    record = learn.grad_stats
    assert len(batches.batches) == 8 and len(batches.weights_at_step) == 4
    assert record.steps['step'].tolist() == [0, 1, 2, 3]
    assert_record_matches(record, cap.captured)
    # The recorded gradient is the one of the mean loss over the two accumulated batches, at that step's
    # weights: recompute it independently with a float64 copy of the model.
    df = record.df.set_index(['step', 'layer'])
    for step in range(4):
        model = copy.deepcopy(learn.model).double()
        model.load_state_dict({n: w.double() for n, w in batches.weights_at_step[step].items()})
        xs, ys = zip(*batches.batches[2 * step:2 * step + 2])
        loss = nn.functional.cross_entropy(model(torch.cat(xs).double()), torch.cat(ys))
        loss.backward()
        for n, p in model.named_parameters():
            ref = reference_stats(p.grad, p.detach())
            assert df.loc[(step, n), 'grad_norm'] == pytest.approx(ref['grad_norm'], rel=1e-4)
            assert df.loc[(step, n), 'grad_max'] == pytest.approx(ref['grad_max'], rel=1e-4)
        assert record.steps.loc[step, 'grad_norm'] == pytest.approx(
            float(np.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters()))), rel=1e-4)


# --- overflow-skipped steps --------------------------------------------------------------------------
def test_overflow_skipped_step_is_recorded_and_flagged():
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    scaled = Capture(order=CPUMixedPrecision.order - 0.1)
    cap, overflow = Capture(), OverflowAt(at=2)
    learn.fit(1, 0.1, cbs=[CPUMixedPrecision(init_scale=2. ** 10, bf16=False), GradStats(), scaled, cap, overflow])
    record = learn.grad_stats
    assert record.steps['step'].tolist() == [0, 1, 2, 3]
    assert record.steps['skipped'].tolist() == [False, False, True, False]
    assert [c['skipped'] for c in cap.captured] == [False, False, True, False]
    assert_record_matches(record, cap.captured)
    row = record.df.set_index(['step', 'layer']).loc[(2, '2.weight')]
    assert row['n_inf'] == 1 and row['n_nan'] == 0 and np.isinf(row['grad_norm'])
    # The skipped step's finite values are the unscaled ones.
    for n in ('0.weight', '0.bias', '2.bias'):
        torch.testing.assert_close(scaled.captured[2]['grads'][n] / 2. ** 10, cap.captured[2]['grads'][n], rtol=1e-6, atol=0)
    # The weights did not move at the skipped step, and did at the others.
    for step in range(4):
        same = all(torch.equal(overflow.before[step][n], overflow.after[step][n]) for n in overflow.before[step])
        assert same == (step == 2), f'step {step}'
    assert len(record) == 4 and 'skipped' in repr(record)



@pytest.mark.parametrize('at', [1, 3])
def test_a_skipped_step_has_a_zero_update_norm_also_as_the_last_step(at):
    "The weights did not move at a skipped step: its update_norm is 0 (EXTRA_COLUMNS), in the middle of a fit or at its end."
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    overflow = OverflowAt(at=at)
    learn.fit(1, 0.1, cbs=[CPUMixedPrecision(init_scale=2. ** 10, bf16=False), GradStats(update_ratio=True), overflow])
    df = learn.grad_stats.df
    assert learn.grad_stats.steps['skipped'].tolist() == [step == at for step in range(4)]
    for step in range(4):
        rows = df[df['step'] == step].set_index(df[df['step'] == step]['layer'].astype(str))['update_norm']
        for name, before in overflow.before[step].items():
            expected = float((overflow.after[step][name].double() - before.double()).norm())
            np.testing.assert_allclose(rows[name], expected, rtol=1e-4, err_msg=f'{name} step {step}')
    assert (df.loc[df['step'] == at, 'update_norm'] == 0).all()

# --- which parameters ----------------------------------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_mlp()
        self.unused = nn.Linear(3, 3)  # never called: its grad stays None

    def forward(self, x): return self.body(x)


def test_frozen_parameters_and_parameters_without_grad_are_left_out():
    model = WithUnused()
    learn = make_learner(model, small_dls(n_train=48, bs=16))
    learn.fit(1, 0.1, cbs=GradStats())
    first = learn.grad_stats
    assert set(first.df['layer'].astype(str)) == {'body.0.weight', 'body.0.bias', 'body.2.weight', 'body.2.bias'}
    assert model.unused.weight.grad is None
    # Freeze a parameter that already holds a gradient tensor (fastai zeroes grads in place, never sets None).
    model.body[0].bias.requires_grad_(False)
    assert model.body[0].bias.grad is not None
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(), cap])
    assert all(c['grads']['body.0.bias'] is not None and not c['requires_grad']['body.0.bias'] for c in cap.captured)
    assert set(learn.grad_stats.df['layer'].astype(str)) == {'body.0.weight', 'body.2.weight', 'body.2.bias'}
    assert_record_matches(learn.grad_stats, cap.captured)


# --- validation and lr_find are not recorded -------------------------------------------------------
def test_validation_is_not_recorded():
    dls = small_dls(n_train=48, n_valid=48, bs=16)  # 3 training and 3 validation batches per epoch
    learn = make_learner(tiny_mlp(), dls, cbs=GradStats())
    cap = Capture()
    learn.fit(2, 0.1, cbs=cap)
    record = learn.grad_stats
    assert len(record) == 6 and record.steps['step'].tolist() == list(range(6))
    assert_record_matches(record, cap.captured)  # losses are the training batches' losses
    df_before = record.df.copy()
    learn.validate()
    learn.get_preds(dl=dls.valid)
    assert learn.grad_stats is record and len(record) == 6
    assert record.df.equals(df_before)
    learn.fit(1, 0.1)
    assert record.steps['step'].tolist() == list(range(9))


def test_lr_find_is_not_recorded(tmp_path):
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=GradStats(), path=tmp_path)
    learn.lr_find(num_it=10, show_plot=False, suggest_funcs=None)
    assert not isinstance(getattr(learn, 'grad_stats', None), GradRecord) or len(learn.grad_stats) == 0
    cap = Capture()
    learn.fit(1, 0.1, cbs=cap)
    record = learn.grad_stats
    assert record.steps['step'].tolist() == [0, 1, 2, 3]
    assert_record_matches(record, cap.captured)
    learn.lr_find(num_it=10, show_plot=False, suggest_funcs=None)
    assert learn.grad_stats is record and len(record) == 4
    learn.fit(1, 0.1)
    assert record.steps['step'].tolist() == list(range(8))  # lr_find's steps were not counted either


# --- every, step counting, replacement -------------------------------------------------------------
def test_every_records_steps_0_n_2n():
    learn = make_learner(tiny_mlp(), small_dls(n_train=160, bs=16))  # 10 steps
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(every=3), cap])
    assert len(cap.captured) == 10
    assert_record_matches(learn.grad_stats, cap.captured, steps=[0, 3, 6, 9])


def test_step_keeps_counting_across_fits_of_the_same_callback():
    learn = make_learner(tiny_mlp(), small_dls(n_train=80, bs=16), cbs=GradStats(every=3))  # 5 steps per epoch
    cap = Capture()
    learn.fit(1, 0.1, cbs=cap)
    record = learn.grad_stats
    learn.fit(1, 0.1, cbs=cap)
    assert learn.grad_stats is record
    assert_record_matches(record, cap.captured, steps=[0, 3, 6, 9])
    # and with the same instance passed to fit(cbs=...) twice
    learn2 = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16))
    gs = GradStats()
    learn2.fit(1, 0.1, cbs=gs)
    learn2.fit(1, 0.1, cbs=gs)
    assert learn2.grad_stats is gs.record and learn2.grad_stats.steps['step'].tolist() == list(range(6))


def test_new_gradstats_in_new_fit_replaces_record():
    learn = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16))
    first, second = GradStats(), GradStats()
    learn.fit(1, 0.1, cbs=first)
    old = learn.grad_stats
    cap = Capture()
    learn.fit(1, 0.1, cbs=[second, cap])
    assert learn.grad_stats is second.record and learn.grad_stats is not old
    assert old.steps['step'].tolist() == [0, 1, 2]
    assert_record_matches(learn.grad_stats, cap.captured)  # counted from 0 again, and the second fit's values


# --- the ways to attach it ---------------------------------------------------------------------------
def test_record_survives_fit_with_cbs():
    learn = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16))
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(), cap])
    assert not any(isinstance(cb, GradStats) for cb in learn.cbs)  # fit removed the callback ...
    assert isinstance(learn.grad_stats, GradRecord)                # ... the record stays
    assert_record_matches(learn.grad_stats, cap.captured)


def test_learner_cbs_and_fit_one_cycle():
    learn = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16), opt_func=Adam, cbs=GradStats())
    cap = Capture()
    learn.fit_one_cycle(2, 1e-2, cbs=cap)
    assert any(isinstance(cb, GradStats) for cb in learn.cbs)
    assert_record_matches(learn.grad_stats, cap.captured)


def test_fine_tune_records_head_then_all_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10))
    learn = make_learner(model, small_dls(n_train=48, bs=16), opt_func=Adam,
                         splitter=lambda m: [params(m[0]), params(m[1])])
    cap = Capture()
    learn.fine_tune(1, 1e-2, freeze_epochs=1, cbs=[GradStats(), cap])
    record = learn.grad_stats
    assert record.steps['step'].tolist() == list(range(6))
    layers_by_step = record.df.groupby('step', observed=True)['layer'].apply(lambda s: sorted(s.astype(str)))
    assert all(layers_by_step[s] == ['1.bias', '1.weight'] for s in range(3))  # frozen body left out
    assert all(layers_by_step[s] == ['0.0.bias', '0.0.weight', '1.bias', '1.weight'] for s in range(3, 6))
    assert_record_matches(record, cap.captured)
    assert cap.captured[-1]['lrs'][0] < cap.captured[-1]['lrs'][-1]  # discriminative lrs; `lr` is the head's


# --- interrupted fits ------------------------------------------------------------------------------
class RaiseAt(Callback):
    "Raises `exc` at `event` of the training batch number `at` (counted over the whole fit)."
    order, run_valid = 0, False

    def __init__(self, exc, at, event='before_batch'):
        self.exc, self.at, self.n = exc, at, 0
        setattr(self, event, self._maybe_raise)

    def _maybe_raise(self):
        if self.n == self.at: raise self.exc()
        self.n += 1


def test_keyboard_interrupt_keeps_the_record():
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    cap = Capture()
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 0.1, cbs=[GradStats(), cap, RaiseAt(KeyboardInterrupt, at=5)])
    assert learn.grad_stats.steps['step'].tolist() == [0, 1, 2, 3, 4]
    assert_record_matches(learn.grad_stats, cap.captured)



def test_keyboard_interrupt_keeps_the_last_steps_update_norm():
    "Ctrl-C between steps: the last applied step's update norm, still on the device, is fetched when the record is read."
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    cap, cb = Capture(), GradStats(update_ratio=True)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 0.1, cbs=[cb, cap, RaiseAt(KeyboardInterrupt, at=5)])
    record = learn.grad_stats
    after = {n: p.detach().double() for n, p in learn.model.named_parameters()}
    weights = [c['params'] for c in cap.captured] + [after]   # before each step, then after the last one
    assert record.pending_last
    copied = pickle.loads(pickle.dumps(record))  # what `learn.export` would pickle: the values go with it
    df = record.df
    assert df['step'].max() == 4 and not record.pending_last and copied.df.equals(df)
    for step in range(5):
        for name in weights[step]:
            expected = float((weights[step + 1][name] - weights[step][name]).norm())
            got = df.loc[(df['step'] == step) & (df['layer'].astype(str) == name), 'update_norm'].item()
            np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=f'{name} step {step}')
    last = df.loc[df['step'] == 4, 'update_norm'].to_numpy()
    learn.fit(1, 0.1, cbs=cb)  # the same callback fits on: the norms it still holds change nothing
    df = learn.grad_stats.df
    np.testing.assert_array_equal(df.loc[df['step'] == 4, 'update_norm'].to_numpy(), last)
    assert df['update_norm'].notna().all() and df['step'].max() == 8

@pytest.mark.parametrize('by_rows', [True, False])
def test_update_norms_match_the_weights_before_and_after_each_step(monkeypatch, by_rows):
    """`update_norm` is ||w_after - w_before|| of every step, recording every other step: the weights kept in rows
    on the CPU (each recorded step's parameter copy, reused) and, as on CUDA, in one copy per parameter."""
    import fastai_gradstats.stats as stats_module
    if not by_rows: monkeypatch.setattr(stats_module.layout, '_param_norms_by_rows', lambda device: False)
    learn = make_learner(tiny_mlp(), small_dls(n_train=96, bs=16))
    cap = Capture()
    learn.fit(2, 0.1, cbs=[GradStats(every=2, update_ratio=True), cap])
    after = {n: p.detach().double() for n, p in learn.model.named_parameters()}
    weights = [c['params'] for c in cap.captured] + [after]
    df = learn.grad_stats.df
    assert sorted(df['step'].unique()) == list(range(0, len(cap.captured), 2))
    for step in df['step'].unique():
        for name in weights[step]:
            expected = float((weights[step + 1][name] - weights[step][name]).norm())
            got = df.loc[(df['step'] == step) & (df['layer'].astype(str) == name), 'update_norm'].item()
            np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=f'{name} step {step}')


def test_vanishing_updates_of_zero_initialized_biases_are_recorded_exactly():
    """SGD on a loss scaled by 1e-22: the weights do not move in float32 (update_norm 0), the zero-initialized biases
    move by about 1e-23 per element, whose float32 squares vanish. Their update_norm matches the float64 distance."""
    model = tiny_mlp()
    with torch.no_grad():
        for layer in (model[0], model[2]): layer.bias.zero_()
    learn = make_learner(model, small_dls(n_train=48, bs=16))
    base = learn.loss_func
    learn.loss_func = lambda out, targ: base(out, targ) * 1e-22
    cap = Capture()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)  # vanishing gradients, as intended
        learn.fit(1, 0.1, cbs=[GradStats(update_ratio=True), cap])
    weights = [c['params'] for c in cap.captured] + [{n: p.detach().double() for n, p in learn.model.named_parameters()}]
    df = learn.grad_stats.df
    for step in df['step'].unique():
        for name in weights[step]:
            expected = float((weights[step + 1][name] - weights[step][name]).norm())
            got = df.loc[(df['step'] == step) & (df['layer'].astype(str) == name), 'update_norm'].item()
            if name.endswith('bias'): assert 0 < expected < 1e-20
            else: assert expected == 0
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0, err_msg=f'{name} step {step}')


def test_a_callback_pickled_by_the_previous_version_trains_on():
    """A GradStats pickled (`learn.export`) before `_kept_params` existed, without that attribute, records on after loading
    (fastai's Callback would otherwise look the missing name up on the Learner and fail)."""
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    cb = GradStats()
    learn.fit(1, 0.1, cbs=cb)
    del cb.__dict__['_kept_params']
    loaded = pickle.loads(pickle.dumps(cb))
    assert '_kept_params' not in loaded.__dict__
    learn.fit(1, 0.1, cbs=loaded)
    assert learn.grad_stats is loaded.record and len(loaded.record) == 8 and loaded.record.df['grad_norm'].notna().all()


def test_cancel_fit_keeps_the_record():
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    cap = Capture()
    learn.fit(2, 0.1, cbs=[GradStats(), cap, RaiseAt(CancelFitException, at=5, event='after_batch')])
    assert learn.grad_stats.steps['step'].tolist() == list(range(6))
    assert_record_matches(learn.grad_stats, cap.captured)


class FailingModel(nn.Module):
    "Raises in its training forward pass number `at` (0-based)."
    def __init__(self, at):
        super().__init__()
        self.net, self.at, self.calls = tiny_mlp(), at, 0

    def forward(self, x):
        if self.training:
            if self.calls == self.at: raise RuntimeError('boom in forward')
            self.calls += 1
        return self.net(x)


def test_exception_in_model_keeps_the_record():
    learn = make_learner(FailingModel(at=6), small_dls(n_train=64, bs=16))
    cap = Capture()
    with pytest.raises(RuntimeError, match='boom'):
        learn.fit(2, 0.1, cbs=[GradStats(), cap])
    assert learn.grad_stats.steps['step'].tolist() == list(range(6))
    assert_record_matches(learn.grad_stats, cap.captured)


def test_exception_in_first_forward_leaves_no_hooks_on_the_model():
    model = FailingModel(at=0)
    learn = make_learner(model, small_dls(n_train=32, bs=16))
    with pytest.raises(RuntimeError, match='boom'):
        learn.fit(1, 0.1, cbs=GradStats())
    assert len(learn.grad_stats) == 0
    leftover = {name: len(m._forward_pre_hooks) for name, m in model.named_modules() if m._forward_pre_hooks}
    assert not leftover, f'GradStats left forward pre-hooks on the model after the failed fit: {leftover}'


def interrupt_in_optimizer_step(learn, at, n_epoch=1):
    "Fit `learn` until Ctrl-C arrives while the optimizer applies step `at` (counted from 0), as a user's would."
    learn.create_opt()
    real_step, calls = learn.opt.step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at + 1: raise KeyboardInterrupt()
        return real_step(*args, **kwargs)
    learn.opt.step = step
    try:
        with pytest.raises(KeyboardInterrupt): learn.fit(n_epoch, 0.1)
    finally: learn.opt.step = real_step


def test_interrupt_during_optimizer_step_then_fit_again():
    "Ctrl-C while the optimizer applies step 2, then the user fits again with the same Learner(cbs=GradStats())."
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=GradStats())
    interrupt_in_optimizer_step(learn, at=2)
    kept = learn.grad_stats.steps['step'].tolist()
    assert kept[:2] == [0, 1]
    learn.fit(1, 0.1)  # must not fail
    steps = learn.grad_stats.steps['step'].tolist()
    assert steps[:len(kept)] == kept and len(steps) == len(kept) + 4
    assert np.all(np.diff(steps) > 0)


def test_interrupt_during_an_optimizer_step_leaves_its_update_norm_unknown():
    "Ctrl-C inside the optimizer step of recorded step 4 (every=2): whether it applied is unknown, so NaN, not step 5's update."
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=GradStats(every=2, update_ratio=True))
    interrupt_in_optimizer_step(learn, at=4, n_epoch=2)
    learn.fit(1, 0.1)
    df = learn.grad_stats.df
    assert sorted(set(df['step'])) == [0, 2, 4, 6, 8]
    assert df.loc[df['step'] == 4, 'update_norm'].isna().all()
    assert df.loc[df['step'] != 4, 'update_norm'].notna().all()

class CancelFitInStep(Callback):
    "Raises CancelFitException at `before_step` of step `at`: after GradStats recorded it, before the optimizer."
    order, run_valid = GradientClip.order, False

    def __init__(self, at): self.at, self.count = at, 0

    def before_step(self):
        if self.count == self.at: raise CancelFitException()

    def after_step(self): self.count += 1


def test_fit_cancelled_inside_a_step_then_fit_again():
    "A fit cancelled between GradStats' record and the optimizer step; the same Learner(cbs=GradStats()) fits again."
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=GradStats())
    learn.fit(1, 0.1, cbs=CancelFitInStep(at=2))
    kept = learn.grad_stats.steps['step'].tolist()
    assert kept[:2] == [0, 1]
    learn.fit(1, 0.1)  # must not fail
    steps = learn.grad_stats.steps['step'].tolist()
    assert steps[:len(kept)] == kept and len(steps) == len(kept) + 4
    assert np.all(np.diff(steps) > 0)


def test_step_cancelled_by_cancel_fit_is_kept_with_its_update_norm():
    """A step cut by another callback's CancelFitException is kept as recorded. GradStats cannot tell whether the optimizer
    applied it (an earlier callback may raise after the step), so it is not flagged skipped; its update norm says: 0."""
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(update_ratio=True), cap, CancelFitInStep(at=2)])
    after = {n: p.detach().double() for n, p in learn.model.named_parameters()}
    assert all(torch.equal(cap.captured[2]['params'][n], after[n]) for n in after)  # step 2 was never applied
    assert learn.grad_stats.steps['step'].tolist() == [0, 1, 2]
    assert_record_matches(learn.grad_stats, cap.captured)
    df = learn.grad_stats.df
    assert (df.loc[df['step'] == 2, 'update_norm'] == 0).all() and (df.loc[df['step'] < 2, 'update_norm'] > 0).all()


# --- export -----------------------------------------------------------------------------------------
def test_learner_with_gradstats_exports_and_loads(tmp_path):
    dls = small_dls(n_train=48, bs=16)
    learn = make_learner(tiny_mlp(), dls, cbs=GradStats(), path=tmp_path)
    learn.fit(1, 0.1)
    df = learn.grad_stats.df.copy()
    learn.export('learner.pkl')
    assert (tmp_path / 'learner.pkl').is_file()
    assert learn.grad_stats.df.equals(df)  # exporting changed nothing
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(tmp_path / 'learner.pkl')
    quiet(loaded)
    assert any(isinstance(cb, GradStats) for cb in loaded.cbs)
    assert loaded.grad_stats.df.equals(df)
    loaded.dls = dls
    preds, _ = loaded.get_preds(dl=dls.valid)
    expected, _ = learn.get_preds(dl=dls.valid)
    torch.testing.assert_close(preds, expected)
    cap = Capture(start=3)
    loaded.fit(1, 0.1, cbs=cap)
    record = loaded.grad_stats
    assert record.steps['step'].tolist() == list(range(6))  # the loaded callback keeps counting
    assert record.df[record.df.step < 3].reset_index(drop=True).equals(df)
    assert_record_matches(record, cap.captured, since=3)


# --- the callback never changes training -------------------------------------------------------------
def train_once(cbs):
    set_seed(0, reproducible=True)
    dls = small_dls(n_train=96, bs=16)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    learn = make_learner(model, dls, opt_func=Adam)
    learn.fit_one_cycle(2, 1e-2, cbs=cbs())
    return [p.detach().clone() for p in model.parameters()], learn


@pytest.mark.parametrize('gradstats', [lambda: GradStats(),
                                       lambda: GradStats(every=2, zero_tol=1e-3, hist_sample=16, update_ratio=True)],
                         ids=['default', 'options'])
def test_weights_bit_identical_with_and_without_gradstats(gradstats):
    without, _ = train_once(lambda: [])
    again, _ = train_once(lambda: [])
    assert all(torch.equal(a, b) for a, b in zip(without, again))  # the set-up is deterministic
    with_cb, learn = train_once(lambda: [gradstats()])
    assert len(learn.grad_stats) > 0
    assert all(torch.equal(a, b) for a, b in zip(without, with_cb))


# --- arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, name', [({'every': 0}, 'every'), ({'every': -2}, 'every'),
                                          ({'zero_tol': -1}, 'zero_tol'), ({'zero_tol': float('nan')}, 'zero_tol'),
                                          ({'zero_tol': float('inf')}, 'zero_tol'), ({'hist_sample': 0}, 'hist_sample'),
                                          ({'hist_sample': np.int64(-1)}, 'hist_sample'), ({'every': 10 ** 30}, 'every'),
                                          ({'keep_last': 2 ** 63}, 'keep_last')])
def test_bad_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradStats(**kwargs)


@pytest.mark.parametrize('kwargs, name', [({'every': 1.5}, 'every'), ({'every': '2'}, 'every'),
                                          ({'every': True}, 'every'), ({'zero_tol': '0'}, 'zero_tol'),
                                          ({'hist_sample': 100.0}, 'hist_sample'), ({'hist_sample': '100'}, 'hist_sample')])
def test_bad_argument_types_raise(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        GradStats(**kwargs)


def test_numpy_integer_arguments_train_as_ints():
    """`every` and `hist_sample` given as numpy integers (from a grid of settings) train and count like Python ints:
    the histogram counts `hist_sample` elements of the large tensor, and every other step is recorded."""
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))
    learn.fit(1, 0.1, cbs=GradStats(every=np.int64(2), hist=True, hist_sample=np.int64(100)))
    record = learn.grad_stats
    assert record.args['hist_sample'] == 100 and type(record.args['every']) is int
    assert record.df['step'].tolist()[::len(record.layers)] == [0, 2]
    hist = record.hist
    counts = hist[list(HIST_BINS)].sum(axis=1).groupby(hist['layer'].astype(str)).unique()
    # 64 x 16 and 16 x 10 weights: 100 of their elements each step; the biases' 16 and 10 counted whole
    assert {name: list(c) for name, c in counts.items()} == {'0.weight': [100], '0.bias': [16], '2.weight': [100], '2.bias': [10]}


def test_input_to_output_needs_a_loss_with_a_graph():
    with pytest.raises(TypeError, match='`loss`'): input_to_output(3.0, [])
    with pytest.raises(ValueError, match='`loss`'): input_to_output(torch.tensor(1.0), [])


# --- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize('where', ['model', 'submodule'])
def test_a_compiled_model_keeps_its_own_parameter_names(where):
    """`torch.compile` wraps a module in an OptimizedModule whose parameters are named `_orig_mod.<name>`: the record
    names them as the uncompiled model does, with the statistics of a float64 reference (the eager backend: no C++
    compiler needed, the same wrapper)."""
    torch._dynamo.reset()
    model = tiny_mlp()
    plain_names = [n for n, _ in model.named_parameters()]
    if where == 'model': model = torch.compile(model, backend='eager')
    else: model[0] = torch.compile(model[0], backend='eager')
    assert any('_orig_mod' in n for n, _ in model.named_parameters())  # the wrapper renames them
    learn = make_learner(model, small_dls(n_train=48, bs=16))
    cap = Capture()
    learn.fit(1, 0.1, cbs=[GradStats(), cap])
    unwrap = lambda name: name.replace('_orig_mod.', '')
    for c in cap.captured:
        for key in ('grads', 'params', 'requires_grad'): c[key] = {unwrap(n): v for n, v in c[key].items()}
    record = learn.grad_stats
    assert sorted(record.layers['name']) == sorted(plain_names)
    assert_record_matches(record, cap.captured)
    torch._dynamo.reset()


def test_layers_say_which_parameters_required_a_gradient(tmp_path):
    "`.layers.requires_grad` is each parameter's flag in the last fit, kept by save/load; a fine_tune's second fit updates it."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10))
    learn = make_learner(model, small_dls(n_train=48, bs=16), opt_func=Adam,
                         splitter=lambda m: [params(m[0]), params(m[1])])
    learn.freeze()
    cb = GradStats()
    learn.fit(1, 1e-3, cbs=cb)
    flags = lambda r: dict(zip(r.layers['name'], r.layers['requires_grad']))
    assert flags(learn.grad_stats) == {n: p.requires_grad for n, p in learn.model.named_parameters()}
    assert flags(learn.grad_stats) == {'0.0.weight': False, '0.0.bias': False, '1.weight': True, '1.bias': True}
    learn.unfreeze()
    learn.fit(1, 1e-3, cbs=cb)
    assert set(flags(learn.grad_stats).values()) == {True} and len(learn.grad_stats) == 6
    from fastai_gradstats import load
    assert flags(load(learn.grad_stats.save(tmp_path/'run'))) == flags(learn.grad_stats)
    unknown = GradRecord([{'name': 'a', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 0}])
    assert unknown.layers['requires_grad'].tolist() == [None]
    with pytest.raises(TypeError, match='requires_grad'):
        GradRecord([{'name': 'a', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 0, 'requires_grad': 'yes'}])


def test_the_record_keeps_the_batch_size_and_gradient_clip_of_the_fit():
    "`args['batch_size']` is the training DataLoader's, `args['gradient_clip']` a GradientClip's max_norm (None without)."
    learn = make_learner(tiny_mlp(), small_dls(n_train=48, bs=16))
    cb = GradStats()
    learn.fit(1, 0.1, cbs=cb)
    assert learn.grad_stats.args['batch_size'] == 16 and learn.grad_stats.args['gradient_clip'] is None
    learn.fit(1, 0.1, cbs=[cb, GradientClip(max_norm=0.5)])
    assert learn.grad_stats.args['gradient_clip'] == 0.5
