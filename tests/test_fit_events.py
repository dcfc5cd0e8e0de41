"""`GradStats` among fastai's other uses of the training loop's events: validation contexts (`validate`, `get_preds`,
`predict`, `summary`, also from inside a fit), cancellations by other callbacks after a step was recorded, parameters
that start training in the middle of a fit, sparse gradients and a layer replaced between fits. Every recorded number
is held against gradients and weights captured independently at the same step."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from fastai.basics import (SGD, Callback, CancelBatchException, CancelEpochException, CancelFitException,
                           CancelStepException, CancelTrainException, params)
import fastai.callback.all  # noqa: F401  (patches Learner.summary)

from fastai_gradstats import GradStats, load

from helpers import Capture, assert_record_matches, make_learner, reference_stats, small_dls, tiny_mlp


class OutputFirst(nn.Module):
    "Registers its output layer before its input layer: registration order is not depth order."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.out, self.inp = nn.Linear(16, 10), nn.Linear(64, 16)

    def forward(self, x): return self.out(self.inp(x).relu())


class ValidateEachEpoch(Callback):
    """Runs `learn.validate()` from inside the fit, at the end of every training epoch, as some user callbacks do
    (not at the end of a validation's own epoch: the Learner's lock would wait for itself)."""
    order = 100

    def __init__(self): self.trained, self.calls = False, 0

    def before_train(self): self.trained = True

    def after_epoch(self):
        if not self.trained: return
        self.trained = False
        self.learn.validate()
        self.calls += 1


def fit_quietly(learn, epochs, lr=0.1, cbs=None):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(epochs, lr, cbs=cbs)
    return learn


# --- validation contexts --------------------------------------------------------------------------
def test_validate_get_preds_and_summary_after_a_fit_change_nothing():
    "They send before_fit/after_fit too: the layer table (depth read from the graph), the steps and the count stay."
    learn = make_learner(OutputFirst(), cbs=GradStats(update_ratio=True))
    fit_quietly(learn, 1)
    record = learn.grad_stats
    layers, df, steps = record.layers.copy(), record.df.copy(), record.steps.copy()
    assert layers.sort_values('depth')['name'].tolist() == ['inp.weight', 'inp.bias', 'out.weight', 'out.bias']
    learn.validate(); learn.get_preds()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.summary()
    assert learn.grad_stats is record
    import pandas as pd
    pd.testing.assert_frame_equal(record.layers, layers)
    pd.testing.assert_frame_equal(record.df, df)
    pd.testing.assert_frame_equal(record.steps, steps)
    cap = Capture(start=len(steps))
    fit_quietly(learn, 1, cbs=cap)   # the next fit goes on counting where the first one ended
    assert_record_matches(record, cap.captured, since=len(steps))


def test_a_callback_that_validates_inside_the_fit_loses_no_step():
    learn = make_learner(tiny_mlp(), cbs=[GradStats(), ValidateEachEpoch()])
    cap = Capture()
    fit_quietly(learn, 3, cbs=cap)
    assert learn.cbs.filter(lambda c: isinstance(c, ValidateEachEpoch))[0].calls == 3
    assert len(cap.captured) == 3 * len(learn.dls.train)
    assert_record_matches(learn.grad_stats, cap.captured)


def test_tensorboard_export_with_validation_inside_and_after_the_fit(tmp_path):
    pytest.importorskip('tensorboard')
    from fastai_gradstats import TensorBoardGradStats
    learn = make_learner(tiny_mlp(), cbs=[GradStats(), ValidateEachEpoch()])
    fit_quietly(learn, 2, cbs=TensorBoardGradStats(log_dir=str(tmp_path), hist_every=1))   # no crash at its end
    learn.validate(); learn.get_preds()
    assert len(list(tmp_path.glob('events.out.tfevents.*'))) == 1   # a validation opens no writer of its own


class WeightsAtEachStep(Callback):
    order = GradStats.order + 0.05

    def __init__(self): self.before = []

    def before_step(self): self.before.append({n: p.detach().double().clone() for n, p in self.learn.model.named_parameters()})


# --- a step cancelled after GradStats recorded it ----------------------------------------------------
class CancelAfterRecording(Callback):
    """Ordered after GradStats: captures every gradient norm and weight at `before_step`, then raises `error` at the
    calls in `at` (counted from 0), so GradStats has recorded a step whose `after_step` never comes."""
    order = GradStats.order + 0.05

    def __init__(self, error, at): self.error, self.at, self.calls, self.norms, self.weights = error, set(at), 0, [], []

    def before_step(self):
        named = list(self.learn.model.named_parameters())
        self.norms.append({n: float(p.grad.double().norm()) for n, p in named})
        self.weights.append({n: p.detach().clone() for n, p in named})
        self.calls += 1
        if self.calls - 1 in self.at: raise self.error()


@pytest.mark.parametrize('every', [1, 2])
@pytest.mark.parametrize('error', [CancelBatchException, CancelEpochException, CancelTrainException])
def test_a_step_cancelled_after_it_began_is_counted_and_kept_as_recorded(error, every):
    """Counted whether recorded or not (`every`); not flagged skipped, since GradStats cannot tell whether it was applied,
    but its update norm (0 here: the optimizer never ran) is measured when the next step begins."""
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16))   # 4 batches per epoch
    cancel = CancelAfterRecording(error, at={1, 7})                    # 7: the last step the fit reaches
    fit_quietly(learn, 3, cbs=[GradStats(every=every, update_ratio=True), cancel])
    record = learn.grad_stats
    n = cancel.calls
    assert record.steps['step'].tolist() == list(range(0, n, every))  # every step counted once, recorded or not
    assert not record.steps['skipped'].any()
    df = record.df
    final = {k: p.detach().clone() for k, p in learn.model.named_parameters()}
    for i in range(0, n, every):
        rows = df[df['step'] == i].set_index(df[df['step'] == i]['layer'].astype(str))
        after = cancel.weights[i + 1] if i + 1 < n else final
        for name, norm in cancel.norms[i].items():
            np.testing.assert_allclose(rows.loc[name, 'grad_norm'], norm, rtol=1e-5)
            moved = float((after[name].double() - cancel.weights[i][name].double()).norm())
            assert (moved == 0) == (i in cancel.at)
            np.testing.assert_allclose(rows.loc[name, 'update_norm'], moved, rtol=1e-4)


class StopAfterStep(Callback):
    "Ordered before GradStats: raises CancelFitException in `after_step` of call `at`, after the optimizer applied it."
    order = 0

    def __init__(self, at): self.at, self.calls = at, 0

    def after_step(self):
        self.calls += 1
        if self.calls - 1 == self.at: raise CancelFitException()


def test_a_step_applied_before_a_cancellation_is_not_called_skipped():
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=GradStats(update_ratio=True))
    weights = WeightsAtEachStep()
    fit_quietly(learn, 1, cbs=[StopAfterStep(2), weights])
    record = learn.grad_stats
    assert record.steps['step'].tolist() == [0, 1, 2] and not record.steps['skipped'].any()
    moved = [float((p.detach().double() - weights.before[2][n]).norm()) for n, p in learn.model.named_parameters()]
    assert min(moved) > 0   # it was applied, and its update norm says how far
    np.testing.assert_allclose(record.df.loc[record.df['step'] == 2, 'update_norm'], moved, rtol=1e-4)
    fit_quietly(learn, 1)   # the next fit counts on
    assert record.steps['step'].tolist() == list(range(3 + len(learn.dls.train)))


class CancelStepBefore(Callback):
    "Ordered before GradStats: raises CancelStepException in `before_step` of call `at` (as the fp16 grad scaler does)."
    order = GradStats.order - 0.2

    def __init__(self, at): self.at, self.calls = at, 0

    def before_step(self):
        self.calls += 1
        if self.calls - 1 == self.at: raise CancelStepException()


def test_a_step_cancelled_late_then_one_skipped_early_are_both_kept():
    "A later callback cancels step 2's batch, an earlier one skips step 3: both recorded, only 3 flagged skipped."
    learn = make_learner(tiny_mlp(), small_dls(n_train=128, bs=16))
    fit_quietly(learn, 1, cbs=[GradStats(), CancelAfterRecording(CancelBatchException, at={2}), CancelStepBefore(3)])
    steps = learn.grad_stats.steps
    assert steps['step'].tolist() == list(range(len(learn.dls.train)))
    assert steps['skipped'].tolist() == [s == 3 for s in steps['step']]


# --- parameters that start training in the middle of a fit --------------------------------------------
class UnfreezeAtEpoch1(Callback):
    def before_epoch(self):
        if self.epoch == 1: self.learn.unfreeze()


def _two_part_learner(cbs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10))
    learn = make_learner(model, small_dls(n_train=64, bs=16), splitter=lambda m: [params(m[0]), params(m[1])], cbs=cbs)
    learn.freeze()
    return learn


def test_unfreezing_inside_a_fit_places_the_new_layers_by_depth_and_keeps_update_norms():
    learn = _two_part_learner([GradStats(update_ratio=True), UnfreezeAtEpoch1()])
    cap, weights = Capture(), WeightsAtEachStep()
    fit_quietly(learn, 2, 1e-2, cbs=[cap, weights])
    record = learn.grad_stats
    assert_record_matches(record, cap.captured)
    # depth from the graph once the body trains too: input first
    assert record.layers.sort_values('depth')['name'].tolist() == ['0.0.weight', '0.0.bias', '1.weight', '1.bias']
    df = record.df
    final = {n: p.detach().double() for n, p in learn.model.named_parameters()}
    for step, before in enumerate(weights.before):
        after = weights.before[step + 1] if step + 1 < len(weights.before) else final
        rows = df[df['step'] == step].set_index(df[df['step'] == step]['layer'].astype(str))
        for name in rows.index:
            np.testing.assert_allclose(rows.loc[name, 'update_norm'], float((after[name] - before[name]).norm()),
                                       rtol=1e-4, atol=1e-12, err_msg=f'{name} step {step}')


# --- sparse gradients -----------------------------------------------------------------------------------
class SparseEmbedding(nn.Module):
    "An `nn.Embedding(sparse=True)` looked up by the digits' first pixel: most of its rows get no gradient."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(32, 8, sparse=True), nn.Linear(8, 10)

    def forward(self, x): return self.head(self.emb((x[:, 10] * 2).long().clamp(0, 31)))


class DenseGrads(Callback):
    order = GradStats.order + 0.05

    def __init__(self): self.grads, self.params = [], []

    def before_step(self):
        named = list(self.learn.model.named_parameters())
        self.grads.append({n: p.grad.to_dense().double().numpy().copy() for n, p in named})
        self.params.append({n: p.detach().double().numpy().copy() for n, p in named})


def test_sparse_gradients_are_recorded_as_their_dense_values():
    learn = make_learner(SparseEmbedding(), small_dls(n_train=64, bs=16), opt_func=SGD)
    dense = DenseGrads()
    fit_quietly(learn, 1, cbs=[GradStats(), dense])
    df = learn.grad_stats.df
    assert sorted(df['layer'].astype(str).unique()) == ['emb.weight', 'head.bias', 'head.weight']
    for step, (grads, values) in enumerate(zip(dense.grads, dense.params)):
        rows = df[df['step'] == step].set_index(df[df['step'] == step]['layer'].astype(str))
        for name in grads:
            ref = reference_stats(grads[name], values[name])
            for column, expected in ref.items():
                if column not in rows: continue
                np.testing.assert_allclose(rows.loc[name, column], expected, rtol=1e-5, atol=1e-7,
                                           err_msg=f'{name} {column} step {step}')
    assert (df.loc[df['layer'] == 'emb.weight', 'dead_frac'] > 0.5).all()   # the rows not looked up


# --- a layer replaced between fits ---------------------------------------------------------------------
def test_replaced_layers_keep_their_old_rows_with_their_own_size(tmp_path):
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=GradStats())
    first = Capture()
    fit_quietly(learn, 1, cbs=first)
    torch.manual_seed(1)
    learn.model[0], learn.model[2] = nn.Linear(64, 32), nn.Linear(32, 10)   # wider: other shapes under the same names
    learn.create_opt()
    second = Capture(start=len(first.captured))
    fit_quietly(learn, 1, cbs=second)
    record = learn.grad_stats
    for saved in (record, load(record.save(tmp_path/'run'))):
        df = saved.df
        layers = saved.layers.set_index('name')
        assert layers.loc['2.weight (10x16)', 'shape'] == (10, 16) and layers.loc['2.weight', 'shape'] == (10, 32)
        assert layers.loc['2.bias', 'shape'] == (10,) and '2.bias (10)' not in layers.index   # same shape: the same layer
        old = df[df['layer'] == '2.weight (10x16)']
        assert old['step'].tolist() == [c['step'] for c in first.captured]
        for (_, row), cap in zip(old.iterrows(), first.captured):
            g = cap['grads']['2.weight']
            np.testing.assert_allclose(row['grad_rms'], float(g.norm()) / g.numel() ** 0.5, rtol=1e-5)
        new = df[df['layer'] == '2.weight']
        assert new['step'].tolist() == [c['step'] for c in second.captured]
        for (_, row), cap in zip(new.iterrows(), second.captured):
            g = cap['grads']['2.weight']
            np.testing.assert_allclose(row['grad_rms'], float(g.norm()) / g.numel() ** 0.5, rtol=1e-5)


# --- stop_on_critical, twice --------------------------------------------------------------------------
def test_each_stop_is_a_critical_finding_and_the_next_fit_starts_from_clean_gradients(tmp_path):
    from helpers import InjectNonFinite
    learn = make_learner(tiny_mlp(), small_dls(n_train=128, bs=16), cbs=GradStats(stop_on_critical=True, alerts=False))
    fit_quietly(learn, 1, cbs=InjectNonFinite({3}))   # NaN/Inf gradients at step 3: stopped there
    fit_quietly(learn, 1, cbs=InjectNonFinite({2}))   # the next fit's third step: step 6
    record = learn.grad_stats
    assert record.stopped_steps == [3, 6]
    steps = record.steps
    assert steps['step'].tolist() == list(range(7)) and steps['skipped'].tolist() == [s in (3, 6) for s in range(7)]
    df = record.df
    # fastai leaves the gradients of a cancelled fit in `.grad`: had they stayed, step 4 would have added onto NaN
    assert (df.loc[df['step'].isin([4, 5]), ['n_nan', 'n_inf']] == 0).all().all()
    for run in (record, load(record.save(tmp_path/'run'))):
        assert run.stopped_steps == [3, 6]
        found = run.health().query("check == 'nonfinite'")
        assert found['status'].tolist() == ['critical'] and found['first_step'].tolist() == [3]
        assert found['last_step'].tolist() == [6] and found['value'].tolist() == [2]


# --- exporters -------------------------------------------------------------------------------------------
class SentSteps(Callback):
    "Stands in for an exporter (the same base class): keeps what it was asked to send, and how often it opened."
    def __new__(cls, *args, **kwargs):
        from fastai_gradstats.export import _Exporter
        class _Sent(_Exporter):
            def __init__(self): self.hist_every, self.sent, self.opened, self.closed = 1, [], 0, 0
            def open(self): self.opened += 1
            def send(self, step, scalars, hists): self.sent.append((step, scalars['grad_norm/total']))
            def close(self): self.closed += 1
        return _Sent()


@pytest.mark.parametrize('update_ratio', [False, True])
def test_exporters_send_every_step_once_across_cancellations_and_fits(update_ratio):
    exporter = SentSteps()
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=[GradStats(update_ratio=update_ratio), exporter])
    fit_quietly(learn, 2, cbs=CancelAfterRecording(CancelBatchException, at={0, 2}))   # 0: before anything was sent
    late = SentSteps()                                 # an exporter that joins at the second fit sends only its steps
    fit_quietly(learn, 1, cbs=late)
    learn.validate(); learn.get_preds()
    steps = learn.grad_stats.steps
    assert [s for s, _ in exporter.sent] == steps['step'].tolist() == list(range(12))
    np.testing.assert_allclose([norm for _, norm in exporter.sent], steps['grad_norm'], rtol=1e-6)
    assert [s for s, _ in late.sent] == list(range(8, 12))
    assert exporter.opened == exporter.closed == 2   # once per fit, none for the validations
    learn.lr_find(num_it=5, show_plot=False)          # a throwaway training: nothing sent, nothing opened
    assert exporter.opened == 2 and len(exporter.sent) == 12


def test_a_record_from_before_stopped_steps_still_stops():
    "A record pickled by an earlier version has no `stopped_steps` of its own (the class's empty tuple)."
    from helpers import InjectNonFinite
    gradstats = GradStats(stop_on_critical=True, alerts=False)
    del gradstats.record.__dict__['stopped_steps']
    learn = make_learner(tiny_mlp(), small_dls(n_train=64, bs=16), cbs=gradstats)
    fit_quietly(learn, 1, cbs=InjectNonFinite({1}))
    assert learn.grad_stats.stopped_steps == [1]
