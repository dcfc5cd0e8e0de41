"""Health (issue 5): on real fits of small models, each finding where it should be and nowhere else.

Every expectation (which step first exploded, which layer first went NaN, which layers are dead, how
far gradients fall with depth, the clipping percentile) is computed here from the raw gradients
captured at each optimizer step, or with numpy from the record's step table, not read from the code.
"""
import dataclasses
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.basics import (Adam, BCEWithLogitsLossFlat, Callback, CrossEntropyLossFlat, DataLoaders, Learner, MSELossFlat,
                           SGD, partial, set_seed)
from torch import nn

import fastai_gradstats
from fastai_gradstats import GradientAlert, GradRecord, GradStats, Thresholds, load, suggest_clip, summary
from fastai_gradstats.health import health
from fastai_gradstats.demo import digits_dls, mlp
from helpers import digits, make_learner, small_dls, tiny_mlp
from fastai_gradstats.health import CHECKS, HEALTH_COLUMNS
from fastai_gradstats.stats import METRICS


# --- helpers ---------------------------------------------------------------------------------
class Capture(Callback):
    "Gradients and weights (float64 numpy, by name) after backward, i.e. as the optimizer is about to use them."
    order = GradStats.order + 0.2

    def before_fit(self): self.grads, self.before, self.losses = [], [], []

    def after_backward(self):
        ps = list(self.learn.model.named_parameters())
        self.grads.append({n: p.grad.detach().double().numpy().copy() for n, p in ps})
        self.before.append({n: p.detach().double().numpy().copy() for n, p in ps})
        self.losses.append(float(self.learn.loss))

    def total_norms(self):
        with np.errstate(over='ignore', invalid='ignore'):
            return np.array([math.sqrt(sum(float((g ** 2).sum()) for g in grads.values())) for grads in self.grads])


def fit(model, dls, lr, epochs, opt=Adam, loss=None, seed=0, cbs=(), alerts_seen=None, **gradstats):
    "Train with GradStats and Capture; the GradientAlert warnings go to `alerts_seen` (a list) when given."
    set_seed(seed)
    learn = Learner(dls, model, loss_func=loss or CrossEntropyLossFlat(), opt_func=opt)
    cap = Capture()
    cb = GradStats(**gradstats)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')   # so that "once" is the callback's doing, not Python's
        learn.fit(epochs, lr, cbs=[cb, cap, *cbs])
    if alerts_seen is not None: alerts_seen.extend(w for w in seen if issubclass(w.category, GradientAlert))
    return learn, cap, cb


def regression_dls(n=448, n_in=16, scale=3.0, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + bs, n_in, generator=g) * scale
    y = x @ torch.randn(n_in, 1, generator=g)
    set_seed(seed)   # the DataLoader draws its shuffling seed when it is made
    return DataLoaders.from_dsets(list(zip(x[:n], y[:n])), list(zip(x[n:], y[n:])), bs=bs, device=torch.device('cpu'))


def separable_dls(n, sep, bs, seed=0):
    "Two classes split by x0 = 0 with a margin `sep`: logistic regression can drive its loss to ~0."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).float()
    x[:, 0] = torch.where(y > 0, 1.0, -1.0) * (sep + x[:, 0].abs())
    set_seed(seed)   # the DataLoader draws its shuffling seed when it is made
    return DataLoaders.from_dsets(list(zip(x, y[:, None])), list(zip(x[:64], y[:64, None])), bs=bs,
                                  device=torch.device('cpu'))


def diverging_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 1))


def rows(table, check, status=None):
    out = table[table['check'] == check]
    return out if status is None else out[out['status'] == status]


def not_ok(table, check):
    return rows(table, check)[rows(table, check)['status'] != 'ok']


def weight_names(model):
    "Weights (2+ dims) from input to output: the registration order of these Sequential models."
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


# --- fits ------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def sigmoid_run():
    model = mlp(8, 64, act=nn.Sigmoid)
    learn, cap, _ = fit(model, digits(512), 1e-3, 2)
    return learn.grad_stats, cap, model


@pytest.fixture(scope='module')
def diverging_run():
    "A regression with inputs scaled by 3 and SGD at lr 0.05: the loss explodes, then the gradients turn NaN."
    alerts = []
    learn, cap, _ = fit(diverging_model(), regression_dls(), 0.05, 3, opt=SGD, loss=MSELossFlat(), alerts_seen=alerts)
    return learn.grad_stats, cap, alerts


DEAD_LAYERS = ('0', '4')


@pytest.fixture(scope='module')
def dead_run():
    "48 of 64 units of the first and third hidden Linear have bias -10: with ReLU they never fire."
    torch.manual_seed(0)
    model = mlp(3, 64, init='kaiming')
    with torch.no_grad():
        for i in DEAD_LAYERS: model[int(i)].bias[:48] = -10.0
    learn, cap, _ = fit(model, digits(512), 1e-3, 2)
    return learn.grad_stats, cap


@pytest.fixture(scope='module')
def healthy_run():
    "Kaiming-initialised Linear + BatchNorm1d + ReLU."
    torch.manual_seed(0)
    layers, n = [], 64
    for _ in range(3):
        lin = nn.Linear(n, 64)
        nn.init.kaiming_normal_(lin.weight, nonlinearity='relu'); nn.init.zeros_(lin.bias)
        layers += [lin, nn.BatchNorm1d(64), nn.ReLU()]
    learn, cap, _ = fit(nn.Sequential(*layers, nn.Linear(64, 10)), digits(512), 1e-3, 2)
    return learn.grad_stats, cap


@pytest.fixture(scope='module')
def converged_run():
    """Logistic regression on separable data with Adam (no weight decay, tiny eps, short memory): the weights grow
    steadily, the loss falls step after step to ~0 and the gradient norm to below 1e-7."""
    torch.manual_seed(0)
    learn, cap, _ = fit(nn.Linear(2, 1), separable_dls(2048, 2.0, 256), 0.4, 7, loss=BCEWithLogitsLossFlat(),
                        opt=partial(Adam, wd=0.0, eps=1e-20, mom=0.5, sqr_mom=0.5))
    return learn.grad_stats, cap


# --- vanishing -------------------------------------------------------------------------------
def median_rms(cap, names):
    return np.array([np.median([np.linalg.norm(g[n]) / math.sqrt(g[n].size) for g in cap.grads]) for n in names])


def test_deep_sigmoid_is_flagged_vanishing_at_the_input_weight(sigmoid_run):
    record, cap, model = sigmoid_run
    weights = weight_names(model)
    rms = median_rms(cap, weights)
    ratio = rms[-1] / rms[0]
    assert ratio > 100                                   # the scenario: gradients do vanish towards the input
    table = record.health()
    found = not_ok(table, 'vanishing')
    assert len(found) == 1
    row = found.iloc[0]
    assert row['status'] == 'critical' and row['layer'] == weights[0]
    np.testing.assert_allclose(row['value'], ratio, rtol=1e-3)
    assert row['first_step'] == 0 and row['last_step'] == len(cap.grads) - 1
    assert weights[0] in row['reason'] and weights[-1] in row['reason']


def test_deep_sigmoid_has_no_other_kind_of_problem(sigmoid_run):
    record, cap, _ = sigmoid_run
    table = record.health()
    assert np.isfinite(cap.total_norms()).all() and cap.total_norms().max() < 10
    for check in ('nonfinite', 'exploding', 'total_norm', 'spikes', 'dead', 'converged'):
        assert not_ok(table, check).empty, check


# --- exploding and NaN -----------------------------------------------------------------------
def test_scenario_diverges(diverging_run):
    record, cap, _ = diverging_run
    norms = cap.total_norms()
    assert np.isfinite(norms[0]) and norms[0] < 100 and not np.isfinite(norms[-1])
    assert list(record.steps['step']) == list(range(len(cap.grads)))


def test_too_high_lr_is_flagged_exploding_from_its_first_step(diverging_run):
    "An explosion is growth: the first step over 10x the least of the first three norms (and above 10), or not finite."
    record, cap, _ = diverging_run
    norms = cap.total_norms()
    with np.errstate(invalid='ignore'):
        first = int(np.flatnonzero(~np.isfinite(norms) | ((norms > 10 * norms[:3].min()) & (norms > 10)))[0])
    table = record.health()
    found = not_ok(table, 'exploding')
    assert len(found) == 1 and found.iloc[0]['status'] == 'critical'
    assert found.iloc[0]['first_step'] == first
    assert found.iloc[0]['last_step'] == len(norms) - 1
    # the level alone is no finding: total_norm only says what it was
    total = rows(table, 'total_norm')
    assert list(total['status']) == ['ok'] and total.iloc[0]['value'] == pytest.approx(norms[np.isfinite(norms)].max(), rel=1e-5)


def test_too_high_lr_is_flagged_nonfinite_at_the_output_layer(diverging_run):
    record, cap, _ = diverging_run
    names = [n for n, _ in diverging_model().named_parameters()]          # input to output
    bad = [[n for n in names if not np.isfinite(g[n]).all()] for g in cap.grads]
    first = next(i for i, b in enumerate(bad) if b)
    table = record.health()
    found = not_ok(table, 'nonfinite')
    assert len(found) == 1
    row = found.iloc[0]
    assert row['status'] == 'critical'
    assert row['first_step'] == first
    assert row['layer'] == bad[first][-1]                                  # nearest the output at that step
    assert row['last_step'] == max(i for i, b in enumerate(bad) if b)
    assert f'step {first}' in row['reason']


def test_too_high_lr_is_not_called_vanishing_or_dead(diverging_run):
    record, _, _ = diverging_run
    table = record.health()
    for check in ('vanishing', 'dead', 'converged'):
        assert not_ok(table, check).empty, check


def test_alert_once_with_step_and_layer_on_nan(diverging_run):
    record, cap, alerts = diverging_run
    names = [n for n, _ in diverging_model().named_parameters()]
    bad = [[n for n in names if not np.isfinite(g[n]).all()] for g in cap.grads]
    first = next(i for i, b in enumerate(bad) if b)
    assert sum(1 for b in bad if b) > 5                                    # NaN at many steps ...
    nan_alerts = [str(w.message) for w in alerts if 'NaN' in str(w.message)]
    assert len(nan_alerts) == 1                                            # ... warned once
    assert f'step {first}' in nan_alerts[0] and bad[first][-1] in nan_alerts[0]


def test_alert_once_on_explosion(diverging_run):
    """The alert warns of growth: the first step above 100 and 10x the least of the first three norms (those before
    it, and its own, while they are fewer), once."""
    record, cap, alerts = diverging_run
    norms = cap.total_norms()
    with np.errstate(invalid='ignore'):
        over = [i for i, n in enumerate(norms) if np.isfinite(n) and n > 100 and n > 10 * np.nanmin(norms[:min(i + 1, 3)])]
    assert len(over) >= 2
    first = int(over[0])
    explosion = [str(w.message) for w in alerts if 'norm' in str(w.message) and 'NaN' not in str(w.message)]
    assert len(explosion) == 1
    largest = max(cap.grads[first], key=lambda n: np.linalg.norm(cap.grads[first][n]))
    assert f'step {first}' in explosion[0] and largest in explosion[0]
    assert len(alerts) == 2


def test_a_large_norm_that_does_not_grow_raises_no_alert_nor_stops_training():
    """Regression on targets x8 with a small learning rate: the total norm sits far above total_norm_critical (at
    several hundred, as a healthy resnet18's can) from the first step and does not grow. A level alone is no explosion:
    no alert, and stop_on_critical lets it train to the end."""
    dls = regression_dls()
    for dl in (dls.train, dls.valid): dl.dataset = [(x, 8 * y) for x, y in dl.dataset]
    alerts = []
    learn, cap, cb = fit(diverging_model(), dls, 1e-4, 2, opt=SGD, loss=MSELossFlat(), alerts_seen=alerts,
                         stop_on_critical=True)
    norms = cap.total_norms()
    assert norms.min() > 100 and np.isfinite(norms).all() and norms.max() <= 10 * norms[:3].min()   # the scenario
    assert not alerts and cb.stopped_at is None and len(learn.grad_stats) == len(norms) == 14
    assert not_ok(learn.grad_stats.health(), 'exploding').empty


def test_no_alert_when_alerts_are_off():
    alerts = []
    learn, _, _ = fit(diverging_model(), regression_dls(), 0.05, 1, opt=SGD, loss=MSELossFlat(), alerts_seen=alerts,
                      alerts=False)
    assert not learn.grad_stats.steps['grad_norm'].pipe(np.isfinite).all()
    assert alerts == []


def test_stop_on_critical_stops_before_the_step_is_applied():
    alerts = []
    model = diverging_model()
    learn, cap, cb = fit(model, regression_dls(), 0.05, 3, opt=SGD, loss=MSELossFlat(), alerts_seen=alerts,
                         stop_on_critical=True)
    norms = cap.total_norms()
    with np.errstate(invalid='ignore'):   # the first explosion as the alert reads it (see test_alert_once_on_explosion)
        first = next(i for i, n in enumerate(norms) if not np.isfinite(n) or (n > 100 and n > 10 * np.nanmin(norms[:min(i + 1, 3)])))
    assert first > 0
    assert len(cap.grads) == first + 1                                     # training went no further
    assert cb.stopped_at == first
    record = learn.grad_stats
    assert list(record.steps['step']) == list(range(first + 1))            # the record keeps that step
    np.testing.assert_allclose(record.steps['grad_norm'].iloc[-1], norms[first], rtol=1e-5)
    for name, p in model.named_parameters():                               # and the step was not applied
        np.testing.assert_array_equal(p.detach().double().numpy(), cap.before[first][name])
    assert any('stopping' in str(w.message) for w in alerts)


def test_stop_on_critical_at_the_first_nan(tmp_path):
    "With the explosion threshold out of reach, the first critical step is the first NaN/Inf gradient."
    model = diverging_model()
    learn, cap, cb = fit(model, regression_dls(), 0.05, 3, opt=SGD, loss=MSELossFlat(), stop_on_critical=True,
                         thresholds=Thresholds(total_norm_critical=1e30))
    bad = [not all(np.isfinite(g).all() for g in grads.values()) for grads in cap.grads]
    first = bad.index(True)
    assert len(cap.grads) == first + 1 and cb.stopped_at == first
    record = learn.grad_stats
    assert record.steps['step'].iloc[-1] == first
    assert record.df.loc[record.df['step'] == first, 'n_nan'].sum() > 0
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all()
        np.testing.assert_array_equal(p.detach().double().numpy(), cap.before[first][name])
    # the stopped step is flagged skipped (never applied), but it is the finding, not an fp16 overflow
    assert record.stopped_steps == [first] and bool(record.steps['skipped'].iloc[-1])
    for run in (record, load(record.save(tmp_path/'stopped'))):
        assert run.stopped_steps == [first]
        nonfinite = run.health().query("check == 'nonfinite'")
        assert nonfinite['status'].tolist() == ['critical'] and nonfinite['first_step'].tolist() == [first]
        assert 'stopped training' in run.summary()


# --- dead units ------------------------------------------------------------------------------
def expected_dead(cap, t=Thresholds()):
    "Per weight: median over the second half of the steps of the fraction of units (rows) with an all-zero gradient."
    second = cap.grads[len(cap.grads) // 2:]
    out = {}
    for name, g in cap.grads[0].items():
        if g.ndim < 2: continue
        frac = np.median([np.mean(np.abs(s[name].reshape(len(s[name]), -1)).max(1) == 0) for s in second])
        if frac > t.dead_critical: out[name] = ('critical', frac)
        elif frac > t.dead_warning: out[name] = ('warning', frac)
    return out


def test_negative_bias_relu_layers_are_flagged_dead(dead_run):
    record, cap = dead_run
    expected = expected_dead(cap)
    assert {n for n, (s, _) in expected.items() if s == 'critical'} == {f'{i}.weight' for i in DEAD_LAYERS}
    found = not_ok(record.health(), 'dead')
    assert {r['layer']: r['status'] for _, r in found.iterrows()} == {n: s for n, (s, _) in expected.items()}
    for _, r in found.iterrows():
        np.testing.assert_allclose(r['value'], expected[r['layer']][1], rtol=1e-6)
        assert r['layer'] in r['reason']


def test_dead_layers_are_not_flagged_otherwise(dead_run):
    record, cap = dead_run
    table = record.health()
    assert np.isfinite(cap.total_norms()).all() and cap.total_norms().max() < 10
    for check in ('nonfinite', 'exploding', 'total_norm', 'vanishing', 'spikes'):
        assert not_ok(table, check).empty, check


def test_a_stricter_dead_threshold_flags_more():
    "A layer with some 25-40% dead units: ok under a dead_warning above that, a warning under the default 0.2."
    torch.manual_seed(0)
    model = mlp(1, 64, init='kaiming')
    with torch.no_grad(): model[0].bias[:16] = -10.0
    learn, cap, _ = fit(model, digits(256), 1e-3, 2)
    frac = np.median([np.mean(np.abs(g['0.weight']).max(1) == 0) for g in cap.grads[len(cap.grads) // 2:]])
    assert 0.2 < frac < 0.45
    assert not_ok(learn.grad_stats.health(Thresholds(dead_warning=frac + 0.05)), 'dead').empty
    found = not_ok(learn.grad_stats.health(), 'dead')
    assert list(found['layer']) == ['0.weight'] and list(found['status']) == ['warning']


# --- healthy and converged -------------------------------------------------------------------
def test_well_initialised_batchnorm_model_has_no_critical_finding(healthy_run):
    record, cap = healthy_run
    norms = cap.total_norms()
    assert np.isfinite(norms).all() and 0.1 < norms.max() < 10
    table = record.health()
    assert (table['status'] != 'critical').all(), table[table['status'] == 'critical']
    for check in ('nonfinite', 'exploding', 'total_norm', 'vanishing', 'dead', 'spikes', 'layer_spread'):
        assert not_ok(table, check).empty, check


def test_scenario_converges(converged_run):
    record, cap = converged_run
    norms = cap.total_norms()
    assert norms.min() < 1e-7 and norms[0] > 0.1
    assert max(cap.losses[-5:]) < 1e-6 and cap.losses[0] > 0.1


def test_converged_model_is_not_called_vanishing(converged_run):
    record, cap = converged_run
    table = record.health()
    assert not_ok(table, 'vanishing').empty
    assert not_ok(table, 'stuck').empty
    conv = rows(table, 'converged')
    assert len(conv) == 1 and conv.iloc[0]['reason'].startswith('loss fell')
    assert 'converged' in record.summary()
    assert (table['status'] != 'critical').all()


def test_model_converged_within_its_first_steps_is_not_called_vanishing():
    """Large margin and SGD at lr 2: the first step takes the loss from ~0.8 to ~1e-15 and the gradients from ~3
    to ~1e-14, and they stay there. The loss fell and is flat: convergence, not vanishing and not stuck."""
    torch.manual_seed(0)
    learn, cap, _ = fit(nn.Linear(2, 1), separable_dls(512, 5.0, 32), 2.0, 2, opt=SGD, loss=BCEWithLogitsLossFlat())
    norms = cap.total_norms()
    assert norms[0] > 1 and norms[1:].max() < 1e-7
    assert cap.losses[0] > 0.5 and max(cap.losses[1:]) < 1e-9
    table = learn.grad_stats.health()
    assert not_ok(table, 'vanishing').empty, not_ok(table, 'vanishing')[['status', 'reason']].to_string()
    assert not_ok(table, 'stuck').empty
    assert rows(table, 'converged').iloc[0]['reason'].startswith('loss fell')


# --- thresholds ------------------------------------------------------------------------------
def test_a_stricter_threshold_turns_ok_into_a_warning(healthy_run):
    """A spike factor just above 1 makes every step above the median of the 20 before it (at least 5) a spike: the
    warning counts exactly those, computed here with pandas from the captured gradients."""
    record, cap = healthy_run
    norms = pd.Series(cap.total_norms())
    assert rows(record.health(), 'spikes').iloc[0]['status'] == 'ok'
    before = norms.rolling(20, min_periods=5).median().shift(1)                  # the 20 steps before, 5 at least ...
    after = norms[::-1].rolling(20, min_periods=5).median().shift(1)[::-1]      # ... and after, where 5 follow
    over = np.minimum(norms / before, (norms / after).fillna(np.inf))
    factor = float(np.sort(over.dropna())[-2]) * 0.999   # so that at least two steps are over it
    assert factor > 1
    spikes = (norms > factor * before) & (after.isna() | (norms > factor * after))
    assert spikes.sum() >= 2
    row = rows(record.health(Thresholds(spike_factor=factor)), 'spikes').iloc[0]
    assert row['status'] == 'warning' and row['value'] == spikes.sum() and row['threshold'] == factor
    assert (row['first_step'], row['last_step']) == (spikes.idxmax(), spikes[::-1].idxmax())


def test_layer_spread_against_its_threshold(healthy_run):
    "The spread is a note, and a warning only above layer_spread_critical (layers differ in size by design)."
    record, cap = healthy_run
    weights = [n for n in cap.grads[0] if cap.grads[0][n].ndim >= 2]
    spread = np.median([max(np.linalg.norm(g[n]) for n in weights) / min(np.linalg.norm(g[n]) for n in weights)
                        for g in cap.grads])
    row = rows(record.health(), 'layer_spread').iloc[0]
    np.testing.assert_allclose(row['value'], spread, rtol=1e-4)
    assert row['status'] == ('ok' if spread <= 100 else 'warning')
    row = rows(record.health(Thresholds(layer_spread_warning=spread * 0.5)), 'layer_spread').iloc[0]
    assert row['status'] == 'ok'
    row = rows(record.health(Thresholds(layer_spread_warning=spread * 0.5, layer_spread_critical=spread * 0.9)),
               'layer_spread').iloc[0]
    assert row['status'] == 'warning' and row['threshold'] == pytest.approx(spread * 0.9)


FIELDS = [f.name for f in dataclasses.fields(Thresholds)]


@pytest.mark.parametrize('field', FIELDS)
@pytest.mark.parametrize('bad', [-1.0, 0.0, float('nan')], ids=['negative', 'zero', 'nan'])
def test_bad_threshold_values_raise_naming_the_field(field, bad):
    with pytest.raises(ValueError, match=rf'\b{field}\b'):
        Thresholds(**{field: bad})


@pytest.mark.parametrize('low, value, high', [('total_norm_warning', 150.0, 'total_norm_critical'),
                                              ('total_norm_low', 20.0, 'total_norm_warning'),
                                              ('zero_frac_warning', 0.3, 'zero_frac_critical'),
                                              ('dead_warning', 0.6, 'dead_critical'),
                                              ('layer_spread_warning', 150.0, 'layer_spread_critical'),
                                              ('depth_ratio_warning', 150.0, 'depth_ratio_critical'),
                                              ('ratio_low', 2.0, 'ratio_high')])
def test_warning_above_critical_raises_naming_the_fields(low, value, high):
    assert value > getattr(Thresholds(), high)
    with pytest.raises(ValueError) as e:
        Thresholds(**{low: value})
    assert low in str(e.value) and high in str(e.value)


def test_fractions_above_one_are_rejected():
    with pytest.raises(ValueError, match='dead_critical'):
        Thresholds(dead_critical=1.5)


def test_thresholds_reject_non_numbers():
    with pytest.raises(TypeError, match='total_norm_critical'):
        Thresholds(total_norm_critical='100')
    with pytest.raises(TypeError):
        health(GradRecord(), thresholds={'total_norm_critical': 1})
    for bad in (True, np.bool_(True), 1 + 2j, None, [100.0]):
        with pytest.raises(TypeError, match=r'\btotal_norm_critical\b'):
            Thresholds(total_norm_critical=bad)


def test_a_window_must_be_a_whole_number():
    for bad in (2.5, math.inf):
        with pytest.raises(TypeError, match='spike_window'): Thresholds(spike_window=bad)
    assert Thresholds(spike_window=25.0).spike_window == 25


@pytest.mark.parametrize('kind', [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8])
def test_thresholds_accept_numpy_numbers(kind):
    "Any real number is a threshold: numpy scalars (say from `np.percentile` or a float32 array) act as Python ones."
    t = Thresholds(total_norm_warning=kind(5), spike_window=np.int64(30))
    assert t.total_norm_warning == 5 and t.spike_window == 30
    assert type(t.total_norm_warning) is float and type(t.spike_window) is int  # kept as plain Python numbers
    record = synthetic_record([1.0, 2.0, 60.0, 3.0])
    got, expected = health(record, t), health(record, Thresholds(total_norm_warning=5.0, spike_window=30))
    pd.testing.assert_frame_equal(got, expected)
    row = got[got['check'] == 'total_norm'].iloc[0]
    assert row['status'] == 'ok' and row['threshold'] == 5 and row['value'] == pytest.approx(60)


# --- summary and clipping advice -------------------------------------------------------------
def test_summary_lists_critical_findings_first_with_clipping_advice(diverging_run):
    record, cap, _ = diverging_run
    text = record.summary()
    lines = text.splitlines()
    found = [re.match(r'\s+(CRITICAL|WARNING)\s+(\w+)', l) for l in lines[1:]]
    found = [m.groups() for m in found if m]
    statuses = [s for s, _ in found]
    assert statuses and statuses == sorted(statuses, key=['CRITICAL', 'WARNING'].index)   # worst first
    critical = {c for s, c in found if s == 'CRITICAL'}
    assert {'exploding', 'nonfinite'} <= critical and 'total_norm' not in critical   # the level alone is no finding
    assert not {'vanishing', 'dead'} & critical
    names = [n for n, _ in diverging_model().named_parameters()]
    first_bad = next([n for n in names if not np.isfinite(g[n]).all()] for g in cap.grads if not all(np.isfinite(g[n]).all() for n in names))
    nonfinite = next(l for l in lines if re.match(r'\s+CRITICAL\s+nonfinite', l))
    assert f' {first_bad[-1]}:' in nonfinite
    advice = [l for l in lines if l.strip().startswith('advice:')]
    assert len(advice) == 1
    expected = independent_clip(record.steps)
    assert f"GradientClip(max_norm={expected['max_norm']:.3g})" in advice[0]
    assert f"of {expected['n_steps']} steps" in advice[0]
    header = re.match(r'Gradient health: (\d+) critical, (\d+) warning', lines[0])
    table = record.health()
    assert int(header.group(1)) == (table['status'] == 'critical').sum()
    assert f"{len(cap.grads)} recorded step(s)" in lines[0]


def test_summary_without_explosion_has_no_clipping_advice(healthy_run, sigmoid_run):
    for record in (healthy_run[0], sigmoid_run[0]):
        assert 'advice' not in record.summary()
    text = sigmoid_run[0].summary()
    assert re.search(r'CRITICAL\s+vanishing 0\.weight', text)


def independent_clip(steps, percentile=95.0, window=20, factor=10.0, critical=100.0, warning=10.0):
    """The clip value from the step table: the percentile of the total norms of the applied, finite steps that
    are neither spikes (over `factor` times the median of up to `window` previous such steps, given 5, and of the
    `window` following ones, where 5 follow) nor above the critical band; `warning`, the top of the healthy band, when
    no step is healthy."""
    applied = steps[~steps['skipped'].to_numpy()]
    norms = applied['grad_norm'].to_numpy(float)
    finite = norms[np.isfinite(norms)]
    healthy = []
    for i, v in enumerate(finite):
        prev, following = finite[max(0, i - window):i], finite[i + 1:i + 1 + window]
        spike = len(prev) >= 5 and v > factor * np.median(prev) and (len(following) < 5 or v > factor * np.median(following))
        if not spike and v <= critical: healthy.append(v)
    max_norm = float(np.percentile(healthy, percentile)) if healthy else warning
    return {'max_norm': max_norm, 'n_clipped': int((~(norms <= max_norm)).sum()),   # NaN and Inf clipped, once each
            'n_steps': len(norms), 'percentile': percentile, 'n_healthy': len(healthy),
            'base': 'healthy' if healthy else 'total_norm_warning'}


def synthetic_record(norms, skipped=()):
    layers = [{'name': 'w', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': 0}]
    record = GradRecord(layers)
    idx = record.layer_index(['w'])
    for step, norm in enumerate(norms):
        values = np.full((1, len(METRICS)), 0.01)
        values[0, METRICS.index('grad_norm')] = norm
        values[0, METRICS.index('param_norm')] = 1.0
        record.add_step(step, 0, 1e-3, 1.0, idx, values, skipped=step in skipped)
    return record


def test_suggest_clip_is_the_percentile_of_the_healthy_norms():
    rng = np.random.default_rng(0)
    norms = list(1 + rng.uniform(0, 1, 60))
    norms[25], norms[40] = 50.0, 30.0                 # spikes
    norms[33] = float('nan')                         # non-finite
    norms[12] = 1000.0                               # a skipped step: not applied
    norms[50] = 150.0                                # above the critical band (and a spike)
    norms[55] = float('inf')                         # an Inf gradient: one step, clipped once
    record = synthetic_record(norms, skipped={12})
    got = suggest_clip(record)
    steps = record.steps
    expected = independent_clip(steps)
    healthy = [v for i, v in enumerate(norms) if i not in (25, 40, 33, 12, 50, 55)]
    np.testing.assert_allclose(expected['max_norm'], np.percentile(healthy, 95), rtol=1e-6)   # the helper's own check
    np.testing.assert_allclose(got['max_norm'], np.percentile(np.float32(healthy), 95), rtol=1e-6)
    assert got['n_steps'] == 59
    assert got['n_clipped'] == expected['n_clipped'] <= got['n_steps']
    assert got['percentile'] == 95.0
    assert got['n_healthy'] == expected['n_healthy'] == len(healthy) and got['base'] == 'healthy'
    assert record.suggest_clip() == got
    got = suggest_clip(record, Thresholds(clip_percentile=50.0))
    np.testing.assert_allclose(got['max_norm'], np.median(np.float32(healthy)), rtol=1e-6)


def test_suggest_clip_on_a_real_fit(healthy_run):
    record, cap = healthy_run
    norms = cap.total_norms()
    np.testing.assert_allclose(suggest_clip(record)['max_norm'], np.percentile(norms, 95), rtol=1e-5)
    assert suggest_clip(record)['n_clipped'] == int((norms > np.percentile(norms, 95) * (1 + 1e-6)).sum())


def test_suggest_clip_on_the_diverging_fit(diverging_run):
    record, cap, _ = diverging_run
    norms = cap.total_norms()
    healthy = norms[np.isfinite(norms) & (norms <= 100)]
    got = suggest_clip(record)
    np.testing.assert_allclose(got['max_norm'], np.percentile(healthy, 95), rtol=1e-5)
    assert got['n_clipped'] == int((~np.isfinite(norms) | (norms > got['max_norm'] * (1 + 1e-6))).sum())


def exploding_norms(n=23, start=4e4, fall=0.85):
    "Total norms falling from `start` by `fall` per step, every one above the critical band (like the demo's x3 RNN)."
    return [start * fall ** k for k in range(n)]


def test_suggest_clip_when_no_step_is_healthy():
    """Every norm above the critical band (reviewer's case, the demo's x3 RNN): no percentile of exploded norms (was the
    95th percentile of all of them, 2.88e+04, called 'healthy'); the top of the healthy band, named as such."""
    norms = exploding_norms()
    record = synthetic_record(norms)
    steps = record.steps
    t = Thresholds()
    expected = independent_clip(steps)
    assert expected['n_healthy'] == 0 and (steps['grad_norm'] > t.total_norm_critical).all()   # the helper's own check
    got = suggest_clip(record)
    assert got['base'] == 'total_norm_warning' and got['n_healthy'] == 0
    assert got['max_norm'] == t.total_norm_warning == expected['max_norm']
    assert got['n_clipped'] == int((steps['grad_norm'] > t.total_norm_warning).sum()) == len(norms)
    advice, = [l for l in summary(record).splitlines() if l.strip().startswith('advice:')]
    assert f"GradientClip(max_norm={t.total_norm_warning:g})" in advice
    assert 'total_norm_warning' in advice and 'healthy total norms' not in advice and 'percentile of the' not in advice
    assert f"clipped {len(norms)} of {len(norms)} steps" in advice
    strict = Thresholds(total_norm_low=0.05, total_norm_warning=5.0)
    assert suggest_clip(record, strict)['max_norm'] == 5.0
    assert 'GradientClip(max_norm=5)' in summary(record, strict)
    # one healthy step is enough for a percentile, and the advice names how many it was taken over
    record = synthetic_record([50.0] + norms[1:])
    expected = independent_clip(record.steps)
    got = suggest_clip(record)
    assert got['base'] == 'healthy' and got['n_healthy'] == expected['n_healthy'] == 1
    np.testing.assert_allclose(got['max_norm'], 50.0, rtol=1e-6)
    assert 'percentile of the 1 healthy total norms' in summary(record)


# --- the table -------------------------------------------------------------------------------
def test_health_table_shape(dead_run):
    record, _ = dead_run
    table = record.health()
    assert tuple(table.columns) == HEALTH_COLUMNS
    assert set(CHECKS) <= set(table['check'])                  # every check reports, ok when it found nothing
    ranks = table['status'].map({'critical': 0, 'warning': 1, 'ok': 2}).to_numpy()
    assert (np.diff(ranks) >= 0).all()                         # worst first
    assert set(table['status']) <= {'critical', 'warning', 'ok'}
    assert table['reason'].map(lambda r: isinstance(r, str) and len(r) > 0 and '\n' not in r).all()


def test_health_is_the_same_on_a_loaded_record(diverging_run, dead_run, tmp_path):
    for i, record in enumerate((diverging_run[0], dead_run[0])):
        loaded = load(record.save(tmp_path/f'run{i}'))
        pd.testing.assert_frame_equal(loaded.health(), record.health())
        assert loaded.summary() == record.summary()


def test_health_functions_are_methods_and_exports(dead_run):
    record, _ = dead_run
    pd.testing.assert_frame_equal(health(record), record.health())
    assert summary(record, show_ok=True) == record.summary(show_ok=True)
    assert fastai_gradstats.Thresholds is Thresholds


def test_empty_record_is_an_error():
    with pytest.raises(ValueError, match='empty'):
        health(GradRecord())
    with pytest.raises(ValueError, match='empty'):
        summary(GradRecord())


# --- edge cases of the checks, on hand-built records ------------------------------------------
def layered_record(rms_by_layer, n_steps=20, losses=None, ratios=None, norms=None, ranks=None, dead=None, spreads=None):
    """A record of weight layers `w0` (input) ... with the given rms gradient (16 elements each: grad_norm = 4 rms)
    at every step, param_norm 1 (or `ratios[i]` as grad/param ratio), loss `losses[step]` (default 1.0), dead
    fractions `dead[i]` (default 0) and unit spreads `spreads[i]` (default 0.5)."""
    n = len(rms_by_layer)
    layers = [{'name': f'w{i}', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': i} for i in range(n)]
    record = GradRecord(layers)
    idx = record.layer_index([f'w{i}' for i in range(n)])
    for step in range(n_steps):
        values = np.full((n, len(METRICS)), 0.01)
        grad_norm = 4.0 * np.asarray(rms_by_layer, float)
        if norms is not None: grad_norm = np.full(n, norms[step] / math.sqrt(n))
        values[:, METRICS.index('grad_norm')] = grad_norm
        values[:, METRICS.index('param_norm')] = 1.0 if ratios is None else grad_norm / np.asarray(ratios, float)
        values[:, METRICS.index('zero_frac')] = 0.0 if dead is None else dead
        values[:, METRICS.index('dead_frac')] = 0.0 if dead is None else dead
        values[:, METRICS.index('shared_zero_frac')] = 0.0
        values[:, METRICS.index('unit_spread')] = 0.5 if spreads is None else spreads
        record.add_step(step, 0, 1e-3, 1.0 if losses is None else losses[step], idx, values)
    return record


def test_a_zero_gradient_at_the_input_is_vanishing_not_ok():
    "rms 0 at the input-most weight, rising towards the output: the extreme of vanishing (reviewer's case), not 'ok'."
    table = health(layered_record([0.0, 1e-5, 1e-3, 1e-1]))
    row = rows(table, 'vanishing').iloc[0]
    assert row['status'] == 'critical' and row['value'] == math.inf and row['layer'] == 'w0'
    assert 'falls to 0 from w3 to w0' in row['reason']
    # the same profile with 1e-7 at the input still reads as its finite ratio
    row = rows(health(layered_record([1e-7, 1e-5, 1e-3, 1e-1])), 'vanishing').iloc[0]
    assert row['status'] == 'critical' and row['value'] == pytest.approx(1e6, rel=1e-5)
    # zeros that do not fall steadily (the output side) are not vanishing with depth
    assert rows(health(layered_record([1e-1, 1e-1, 1e-1, 0.0])), 'vanishing').iloc[0]['status'] == 'ok'


def test_summary_names_the_layer_farthest_from_its_threshold():
    """Unit spreads 1e-4, 1e-5, 1e-9 under symmetric_spread 1e-3: the worst is the smallest, w2 (not the largest
    absolute value); dead fractions 0.6, 0.95, 0.7 over dead_critical 0.5: the largest, w1."""
    record = layered_record([1e-3, 1e-3, 1e-3], spreads=[1e-4, 1e-5, 1e-9])
    line, = [l for l in summary(record).splitlines() if 'symmetric' in l]
    assert 'in 3 layers' in line and 'worst w2:' in line and '1e-09' in line.split('worst')[1]
    record = layered_record([1e-3, 1e-3, 1e-3], dead=[0.6, 0.95, 0.7])
    line, = [l for l in summary(record).splitlines() if 'dead' in l]
    assert 'in 3 layers' in line and 'worst w1:' in line and '95%' in line.split('worst')[1]


def test_every_total_norm_nan_is_not_called_ok():
    table = health(layered_record([1e-3, 1e-3, 1e-3], norms=[math.nan] * 20))
    assert rows(table, 'exploding').iloc[0]['status'] == 'warning'
    assert 'no total norm is finite' in rows(table, 'exploding').iloc[0]['reason']
    assert rows(table, 'total_norm').iloc[0]['status'] == 'critical'


def test_an_overflowing_total_norm_counts_as_above_every_threshold():
    """One Inf total norm (a norm beyond float32, no NaN/Inf element): a spike at that step, beyond every multiple of
    the median; an isolated one is no explosion, Inf norms from there to the end are one, with value Inf."""
    norms = [1.0] * 20
    norms[12] = math.inf
    table = health(layered_record([1e-3] * 3, norms=norms))
    spikes = rows(table, 'spikes').iloc[0]
    assert spikes['status'] == 'warning' and spikes['value'] == 1 and spikes['first_step'] == spikes['last_step'] == 12
    assert 'worst infx' in spikes['reason']
    assert rows(table, 'exploding').iloc[0]['status'] == 'ok'
    norms[12:] = [math.inf] * 8
    exploding = rows(health(layered_record([1e-3] * 3, norms=norms)), 'exploding').iloc[0]
    assert exploding['status'] == 'critical' and exploding['value'] == math.inf
    assert exploding['first_step'] == 12 and exploding['last_step'] == 19


def test_an_unknown_loss_is_not_called_stuck():
    "Small gradients and every loss NaN: stuck cannot be judged (was a warning reading 'nan -> nan')."
    table = health(layered_record([1e-3] * 3, norms=[1e-3] * 20, losses=[math.nan] * 20))
    stuck = rows(table, 'stuck').iloc[0]
    assert stuck['status'] == 'ok' and 'not known' in stuck['reason']
    # with a known, flat, high loss the same gradients are stuck
    assert rows(health(layered_record([1e-3] * 3, norms=[1e-3] * 20, losses=[2.0] * 20)), 'stuck').iloc[0]['status'] == 'warning'


def test_grad_param_ratio_is_a_note_naming_its_extremes():
    """The ratio says what a step of SGD would be, not a finding (Adam normalises it, BatchNorm makes it scale-free):
    'ok' whatever its value, naming the weights with the smallest and largest median ratio."""
    record = layered_record([1e-3] * 3, ratios=[1e-9, 0.5, 40.0])
    row, = rows(health(record), 'grad_param_ratio').itertuples()
    assert row.status == 'ok' and row.value == pytest.approx(40.0)
    assert '1e-09 (w0)' in row.reason and '40 (w2)' in row.reason
    assert 'grad_param_ratio' not in summary(record)


def test_summary_counts_the_steps_of_a_merge_of_ranks_once():
    from fastai_gradstats import merge
    record = merge([layered_record([1e-3] * 3, n_steps=40), layered_record([1e-3] * 3, n_steps=40)])
    head = summary(record).splitlines()[0]
    assert 'over 40 recorded step(s) (0-39) on 2 ranks' in head


def test_summary_show_ok_must_be_a_bool():
    record = layered_record([1e-3] * 3)
    for bad in ('no', 1, None):
        with pytest.raises(TypeError, match='`show_ok`'): summary(record, show_ok=bad)


# --- convergence needs gradients that settled too (reviewer's case: an exploded first loss) --------------------
def low_and_flat(losses, t=Thresholds()):
    "The loss test alone, from the losses: the late fifth's median at most loss_converged x the first loss, and flat."
    losses = np.asarray(losses, float)
    late = losses[len(losses) - max(1, len(losses) // 5):]
    half = len(late) // 2
    return (np.median(late) <= t.loss_converged * losses[0]
            and abs(np.median(late[half:]) - np.median(late[:half])) / losses[0] <= t.loss_flat)


def late_total_norm(record):
    steps = record.steps
    return float(steps['grad_norm'].iloc[len(steps) - max(1, len(steps) // 5):].median())


def falling_losses(n=23, start=2676.0, floor=48.0):
    "From `start` down to `floor` within 15 steps, then flat with a little noise (1% of `floor`)."
    rng = np.random.default_rng(0)
    return [max(floor, start * 0.7 ** k) + floor * rng.uniform(-0.01, 0.01) for k in range(n)]


def test_an_exploding_run_whose_loss_fell_is_not_called_converged():
    """Loss 2676 -> ~48 (25x chance) and total norms 4e4 -> 1.1e3, all above critical: the loss test alone passes
    (against the exploded first loss), yet this is an explosion, not convergence (was 'ok converged ... small
    gradients here mean convergence')."""
    losses = falling_losses()
    record = layered_record([1e-3] * 3, n_steps=23, losses=losses, norms=exploding_norms())
    t = Thresholds()
    assert low_and_flat(losses) and late_total_norm(record) > t.total_norm_critical   # the scenario
    table = health(record)
    assert rows(table, 'exploding').iloc[0]['status'] == 'critical'
    conv = rows(table, 'converged').iloc[0]
    assert not conv['reason'].startswith('loss fell') and 'exploding' in conv['reason']
    text = summary(record)
    assert 'converged:' not in text and 'mean convergence' not in text
    assert 'mean convergence' not in summary(record, show_ok=True)


def test_large_late_gradients_are_not_called_converged():
    """Total norm flat at 30 (above warning, below critical: not exploding) while the loss falls and flattens: not
    converged; with total_norm_warning above 30 the same run is converged, as before."""
    losses = falling_losses(start=2.5, floor=0.2)
    norms = [30.0] * 23
    record = layered_record([1e-3] * 3, n_steps=23, losses=losses, norms=norms)
    t = Thresholds()
    assert low_and_flat(losses) and t.total_norm_warning < late_total_norm(record) <= t.total_norm_critical
    table = health(record)
    assert rows(table, 'exploding').iloc[0]['status'] == 'ok' and rows(table, 'nonfinite').iloc[0]['status'] == 'ok'
    conv = rows(table, 'converged').iloc[0]
    assert not conv['reason'].startswith('loss fell')
    assert f"{late_total_norm(record):.3g}" in conv['reason'] and 'total_norm_warning' in conv['reason']
    loose = Thresholds(total_norm_warning=40.0)
    assert rows(health(record, loose), 'converged').iloc[0]['reason'].startswith('loss fell')
    assert 'converged: loss fell' in summary(record, loose)


def test_small_gradients_are_small_in_absolute_terms():
    """Norms falling 100x from 50 to 0.5: a tenth of the start, but inside the textbook's healthy band (from
    total_norm_low 0.1), so neither the convergence note nor 'stuck' may call them small; at 0.01 both may."""
    t = Thresholds()
    losses = falling_losses(start=2.5, floor=0.2)
    for late_norm in (0.5, 0.01):
        norms = list(np.geomspace(50.0, late_norm, 12)) + [late_norm] * 11
        record = layered_record([1e-3] * 3, n_steps=23, losses=losses, norms=norms)
        small = late_total_norm(record) < t.total_norm_low
        assert low_and_flat(losses) and small == (late_norm == 0.01)
        conv = rows(health(record), 'converged').iloc[0]
        assert conv['reason'].startswith('loss fell')
        assert ('small gradients here mean convergence' in conv['reason']) == small
        # a high, flat loss with the same gradients: stuck only where they are small
        stuck = rows(health(layered_record([1e-3] * 3, n_steps=23, losses=[2.3] * 23, norms=norms)), 'stuck').iloc[0]
        assert (stuck['status'] == 'warning') == small


# --- isolated events are not explosions; runs with no applied step (reviewer's cases) ----------------------------
def event_record(norms, losses, nan_steps=(), skipped=(), shapes=((4, 4),) * 3, sets=None, args=None):
    """Weight layers `w0, w1, ...` of `shapes` (three 4x4 by default) sharing each step's total norm `norms[step]` (NaN
    there: one NaN element per layer, at the steps in `nan_steps`), loss `losses[step]`; the steps in `skipped` were
    skipped by the optimizer. `sets[step]`: the layers with a gradient at that step (default: all); `args`: the record's."""
    from fastai_gradstats.record import COUNT_COLUMNS
    layers = [{'name': f'w{i}', 'module': 'Linear', 'shape': shape, 'numel': int(np.prod(shape)), 'depth': i}
              for i, shape in enumerate(shapes)]
    record = GradRecord(layers, args=args)
    for step, norm in enumerate(norms):
        names = [l['name'] for l in layers] if sets is None else sets[step]
        values = np.full((len(names), len(METRICS)), 0.01)
        values[:, METRICS.index('grad_norm')] = norm / math.sqrt(len(names))
        values[:, METRICS.index('param_norm')] = 1e3
        values[:, METRICS.index('zero_frac')] = values[:, METRICS.index('dead_frac')] = 0.0
        counts = np.zeros((len(names), len(COUNT_COLUMNS)), np.int64)
        if step in nan_steps: counts[:, COUNT_COLUMNS.index('n_nan')] = 1
        record.add_step(step, 0, 1e-3, losses[step], record.layer_index(names), values, counts=counts,
                        skipped=step in skipped)
    return record


def test_a_single_nan_step_then_recovery_is_not_an_explosion():
    """Norms about 1, one NaN at step 40 (a loss of log(0)), then recovery while the loss falls and flattens: nonfinite
    names that step, but nothing explodes (was 'exploding' critical 'from step 40' with value 1.98 against 100) and the
    run converged, since the late window is clean; summary advice may remain (the NaN is real)."""
    n = 120
    rng = np.random.default_rng(0)
    norms = list(1 + rng.uniform(0, 1, n))
    losses = falling_losses(n=n, start=2.3, floor=0.1)
    norms[40], losses[40] = math.nan, math.inf
    record = event_record(norms, losses, nan_steps={40})
    table = health(record)
    nonfinite = rows(table, 'nonfinite').iloc[0]
    assert nonfinite['status'] == 'critical' and nonfinite['first_step'] == nonfinite['last_step'] == 40
    exploding = rows(table, 'exploding').iloc[0]
    assert exploding['status'] == 'ok' and 'isolated' in exploding['reason']
    assert rows(table, 'converged').iloc[0]['reason'].startswith('loss fell')
    assert 'CRITICAL exploding' not in summary(record) and 'explode' not in summary(record)
    # the same NaN in the late window does rule out convergence
    norms[40], losses[40], norms[115] = 1.5, 1.0, math.nan
    late = health(event_record(norms, losses, nan_steps={115}))
    assert rows(late, 'exploding').iloc[0]['status'] == 'ok'
    conv = rows(late, 'converged').iloc[0]
    assert not conv['reason'].startswith('loss fell') and 'nonfinite' in conv['reason']


def test_a_single_step_over_the_critical_norm_is_a_spike_not_an_explosion():
    "One step at 325 among norms about 1 (then recovery): a spike there (one, but 300x the median), not 'exploding'."
    n = 120
    rng = np.random.default_rng(1)
    norms = list(0.5 + rng.uniform(0, 1, n))
    norms[20] = 325.0
    losses = falling_losses(n=n, start=2.3, floor=0.4)
    table = health(event_record(norms, losses))
    assert rows(table, 'exploding').iloc[0]['status'] == 'ok'
    total, spikes = rows(table, 'total_norm').iloc[0], rows(table, 'spikes').iloc[0]
    assert total['status'] == 'ok' and total['value'] == pytest.approx(325.0)
    assert spikes['status'] == 'warning' and spikes['first_step'] == spikes['last_step'] == 20
    assert rows(table, 'converged').iloc[0]['reason'].startswith('loss fell')
    # one moderate spike is no pattern; two are
    norms[20] = 12 * np.median(norms[:20])
    assert rows(health(event_record(norms, losses)), 'spikes').iloc[0]['status'] == 'ok'
    norms[60] = 12 * np.median(norms[40:60])
    assert rows(health(event_record(norms, losses)), 'spikes').iloc[0]['status'] == 'warning'


def test_an_explosion_that_persists_is_critical_from_its_first_bad_step_with_a_consistent_value():
    """An early isolated spike at step 5, then norms over 100 from step 80 turning NaN at 100: exploding from step 80
    (not 5), its value the growth of the largest norm over the phase's start (>= growth_factor); one NaN after the norm
    grew 10x past the warning band is an explosion too, valued by that growth. NaN for good straight after normal norms
    is nonfinite (bad data or loss), not an explosion."""
    t = Thresholds()
    n = 120
    norms = [1.0] * n
    norms[5] = 500.0
    norms[80:100] = list(np.geomspace(150.0, 1e5, 20))
    norms[100:] = [math.nan] * 20
    losses = [1.0] * n
    found = rows(health(event_record(norms, losses, nan_steps=set(range(100, n)))), 'exploding').iloc[0]
    assert found['status'] == 'critical' and found['first_step'] == 80 and found['last_step'] == n - 1
    assert found['value'] == pytest.approx(1e5, rel=1e-5) and found['value'] >= found['threshold'] == t.growth_factor
    # straight from healthy to NaN for good: NaN in the data or the loss, which nonfinite names, not an explosion
    norms = [1.0] * 60 + [math.nan] * 60
    table = health(event_record(norms, losses, nan_steps=set(range(60, n))))
    assert rows(table, 'exploding').iloc[0]['status'] == 'ok'
    found = rows(table, 'nonfinite').iloc[0]
    assert found['status'] == 'critical' and found['first_step'] == 60 and 'no growth before' in found['reason']
    assert 'lower the learning rate' not in found['reason']
    # growth by growth_factor past total_norm_warning for 5 steps, then one NaN, then recovery: an explosion from the
    # first of those steps to the NaN
    norms = [1.0] * 30 + list(np.geomspace(2.0, 50.0, 10)) + [math.nan] + [1.0] * 79
    grown = [i for i, v in enumerate(norms) if v > 10 * 1.0 and v > t.total_norm_warning]
    found = rows(health(event_record(norms, losses, nan_steps={40})), 'exploding').iloc[0]
    assert found['status'] == 'critical' and found['first_step'] == grown[0] == 35 and found['last_step'] == 40
    assert found['value'] == pytest.approx(50.0, rel=1e-5) and found['value'] >= found['threshold'] == t.growth_factor
    # growth that stays short of lasting, then one NaN: an explosion at the NaN, valued by the growth before it
    norms = [1.0] * 30 + [2.0, 4.0, 30.0, 1.0, 45.0] + [math.nan] + [1.0] * 84
    found = rows(health(event_record(norms, losses, nan_steps={35})), 'exploding').iloc[0]
    assert found['status'] == 'critical' and found['first_step'] == found['last_step'] == 35
    assert found['value'] == pytest.approx(45.0, rel=1e-5)


def test_a_run_with_every_step_skipped_has_no_norm_finding():
    """The fp16 grad scaler skipped every step so far: total_norm, exploding and spikes say 'no applied step yet' (were
    total_norm critical 'every ... NaN' and exploding warning, against nonfinite's 'normal for mixed precision')."""
    record = event_record([math.nan, math.nan, math.inf], [2.3, 2.3, 2.3], nan_steps={0, 1}, skipped={0, 1, 2})
    table = health(record)
    for check in ('total_norm', 'exploding', 'spikes'):
        row = rows(table, check).iloc[0]
        assert row['status'] == 'ok' and 'no applied step yet' in row['reason'], check
    assert rows(table, 'nonfinite').iloc[0]['status'] == 'ok'
    text = summary(record)
    assert 'CRITICAL' not in text and 'WARNING' not in text and 'advice' not in text


def test_a_short_lasting_explosion_that_recovers_is_still_an_explosion():
    "Norms 1, then 4 steps in a row over 100 (like the demo's lr_too_high), then back to 1: exploding over those steps."
    norms = [1.0] * 10 + [6e4, 2e4, 3e3, 150.0] + [1.0] * 30
    found = rows(health(event_record(norms, [1.0] * len(norms))), 'exploding').iloc[0]
    assert found['status'] == 'critical' and (found['first_step'], found['last_step']) == (10, 13)
    assert found['value'] == pytest.approx(6e4, rel=1e-5)
    # two in a row are still isolated events (spikes)
    norms = [1.0] * 10 + [6e4, 2e4] + [1.0] * 30
    assert rows(health(event_record(norms, [1.0] * len(norms))), 'exploding').iloc[0]['status'] == 'ok'


def update_record(update_ratios, n_steps=20):
    "Weights w0.. with grad_norm 0.4, param_norm 1 and the given update ratios at every step (GradStats(update_ratio=True))."
    n = len(update_ratios)
    layers = [{'name': f'w{i}', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': i} for i in range(n)]
    record = GradRecord(layers, extra_columns=('update_norm',))
    idx = record.layer_index([f'w{i}' for i in range(n)])
    for step in range(n_steps):
        values = np.full((n, len(METRICS) + 1), 0.5)
        values[:, METRICS.index('grad_norm')], values[:, METRICS.index('param_norm')] = 0.4, 1.0
        values[:, METRICS.index('zero_frac')] = values[:, METRICS.index('dead_frac')] = 0.0
        values[:, -1] = update_ratios
        record.add_step(step, 0, 1e-3, 2.3 - 0.1 * step, idx, values)
    return record


def test_summary_gives_each_direction_of_a_finding_its_own_line_and_remedy():
    """Update ratios 0 (w0, w1: weights that do not move), 1e-3 (w2) and 3 (w3: steps larger than the weights): two
    lines, one naming w0 and w1 with the learning rate of their group, one naming w3 with 'lower the learning rate'."""
    record = update_record([0.0, 0.0, 1e-3, 3.0])
    lines = [l for l in summary(record).splitlines() if 'update_ratio' in l]
    assert len(lines) == 2
    still, = [l for l in lines if 'does not move' in l]
    high, = [l for l in lines if 'lower the learning rate' in l]
    assert 'in 2 layers (w0, w1)' in still and 'w3' not in still.split(':')[0] and 'learning rate is 0' in still
    assert 'update_ratio w3:' in high and 'w0' not in high and 'w1' not in high


def dead_record(dead_frac, n_steps=20):
    """Three weight layers w0..w2 with no gradient at all (grad_norm 0), `dead_frac[i]` dead units, and an output bias
    `b` that alone keeps a gradient (0.1, as after the reviewer's too-high learning rate); loss flat at 2.3."""
    layers = [{'name': f'w{i}', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': i} for i in range(3)]
    layers.append({'name': 'b', 'module': 'Linear', 'shape': (4,), 'numel': 4, 'depth': 3})
    record = GradRecord(layers)
    idx = record.layer_index([f'w{i}' for i in range(3)] + ['b'])
    for step in range(n_steps):
        values = np.zeros((4, len(METRICS)))
        values[:, METRICS.index('param_norm')] = 1.0
        values[:3, METRICS.index('dead_frac')] = dead_frac
        values[:3, METRICS.index('zero_frac')] = 1.0
        values[3, METRICS.index('grad_norm')] = 0.1
        record.add_step(step, 0, 1e-3, 2.3, idx, values)
    return record


def test_a_dead_network_is_not_called_healthy_by_vanishing_nor_told_to_raise_the_learning_rate():
    """No gradient anywhere: vanishing has no ratio to judge (was ok 'gradients keep their size', value NaN) and points
    to dead; nothing says 'raise the learning rate' (against dead's 'a smaller learning rate'); the flat loss is dead's."""
    t = Thresholds()
    table = health(dead_record([1.0, 1.0, t.dead_warning]))
    vanishing = rows(table, 'vanishing').iloc[0]
    assert vanishing['status'] == 'ok' and math.isnan(vanishing['value'])
    assert 'keep their size' not in vanishing['reason'] and 'see dead' in vanishing['reason']
    assert not table['reason'].str.contains('raise the learning rate').any()
    assert {'w0', 'w1'} <= set(rows(table, 'dead', 'critical')['layer'])
    learning = rows(table, 'not_learning').iloc[0]
    assert learning['status'] == 'ok' and 'see dead' in learning['reason']


# --- the thresholds a run was recorded with --------------------------------------------------------------
def test_thresholds_given_to_gradstats_reach_the_records_diagnosis_live_and_after_save_load(tmp_path, capsys):
    """`GradStats(thresholds=T)`: the record's health(), summary() and `gradstats summary` hold it against T (here a
    spike factor so low that every rise is a spike), before and after save/load, unless others are passed."""
    import inspect
    from fastai_gradstats import GradStats, Thresholds, cli, load
    strict = Thresholds(spike_factor=1.0001, spike_window=3)
    learn = make_learner(tiny_mlp(), small_dls(n_train=256, bs=16))
    learn.fit(1, 0.1, cbs=GradStats(thresholds=strict))
    record = learn.grad_stats
    assert record.thresholds == strict
    spikes = lambda h: h[h['check'] == 'spikes'].iloc[0]
    assert spikes(record.health())['threshold'] == strict.spike_factor
    assert spikes(record.health(Thresholds()))['threshold'] == Thresholds().spike_factor   # passed ones win
    loaded = load(record.save(tmp_path/'run'))
    assert loaded.thresholds == strict
    pd.testing.assert_frame_equal(loaded.health(), record.health())
    assert loaded.summary() == record.summary()
    assert cli.main(['summary', str(tmp_path/'run')]) == 0
    assert capsys.readouterr().out.rstrip('\n') == record.summary()
    # the record's methods show their real signatures (Shift-Tab, help())
    assert list(inspect.signature(record.health).parameters) == ['thresholds']
    assert list(inspect.signature(record.summary).parameters) == ['thresholds', 'show_ok']
    assert 'show_ok' in record.summary.__doc__


# --- false alarms and misses of the last review: a regression's loss, alternating tensor sets, merges, one empty batch --
def noisy_falling(n, start=2.3, end=0.3, seed=0):
    "A loss falling geometrically from `start` to `end` over `n` steps, with 2% noise."
    return list(np.geomspace(start, end, n) * (1 + 0.02 * np.random.default_rng(seed).standard_normal(n)))


REGRESSION = ((8, 4), (8, 8), (1, 8))   # one output: no classifier, so no "uniform guess" loss to compare with


def test_a_regressions_loss_is_not_read_as_a_classifiers_summed_over_the_batch():
    """A one-output regression whose first MSE, 20, happens to be about its batch size (32) times ln 2: its loss says
    nothing of a summed reduction (was WARNING loss_scale, 'use reduction=mean'), and that finding no longer divides the
    norms by 32 and hides a lasting 20x jump of the total norm (was: no explosion)."""
    n = 60
    steady = health(event_record([3.0] * n, noisy_falling(n, 20, 2), shapes=REGRESSION, args={'batch_size': 32}))
    assert rows(steady, 'loss_scale').iloc[0]['status'] == 'ok'
    assert (steady['status'] == 'ok').all(), not_ok(steady, 'loss_scale')
    jump = health(event_record([3.0] * 20 + [60.0] * 40, [20.0] * n, shapes=REGRESSION, args={'batch_size': 32}))
    assert rows(jump, 'exploding').iloc[0]['status'] == 'critical'
    assert rows(jump, 'exploding').iloc[0]['first_step'] == 20


def test_a_classifiers_summed_loss_is_still_found():
    "Ten classes, batch 64, first loss 64 x ln 10: the loss is summed over the batch (the guard above must not hide it)."
    n = 60
    record = event_record([3.0] * n, noisy_falling(n, 64 * math.log(10), 10), shapes=((8, 4), (8, 8), (10, 8)),
                          args={'batch_size': 64})
    assert rows(health(record), 'loss_scale').iloc[0]['status'] == 'warning'


def test_one_empty_batch_is_not_vanishing_but_lasting_tiny_gradients_are():
    """Norms about 1 and one step with next to no gradient (a batch the loss masks entirely) while the loss falls: no
    vanishing (was CRITICAL 'no learning' for that one step). Norms below vanishing_norm from step 30 to the end, the
    loss flat at chance: critical, from step 30."""
    n = 100
    norms = [1.0] * n
    norms[50] = 1e-9
    one = health(event_record(norms, list(np.linspace(2.3, 1.0, n))))   # still falling at the end: not converged
    assert not_ok(one, 'vanishing').empty, not_ok(one, 'vanishing')[['status', 'reason']].to_string()
    lasting = health(event_record([1.0] * 30 + [1e-9] * 70, [2.3] * n))
    found = not_ok(lasting, 'vanishing')
    assert (found['status'] == 'critical').any() and found.iloc[0]['first_step'] == 30


ALTERNATING = [['w0', 'w1'] if step % 2 == 0 else ['w2'] for step in range(60)]   # a GAN's generator and critic by turns


def test_steps_of_one_tensor_set_are_compared_with_each_other_when_sets_take_turns():
    """fastai's GAN trainer switches the trained tensors every step. The norm growing 1.4x a step from step 20 (to 7e5)
    is an explosion, and five 300x steps are spikes, as they are with one set (were: no finding, since every step
    started a phase of its own)."""
    growing = [1.0] * 20 + [1.4 ** k for k in range(1, 41)]
    for sets in (None, ALTERNATING):
        assert rows(health(event_record(growing, noisy_falling(60), sets=sets)), 'exploding').iloc[0]['status'] == 'critical'
    spiky = [1.0] * 60
    for s in (20, 21, 30, 40, 50): spiky[s] = 300.0
    for sets in (None, ALTERNATING):
        table = health(event_record(spiky, noisy_falling(60), sets=sets))
        assert rows(table, 'spikes').iloc[0]['status'] == 'warning' and rows(table, 'exploding').iloc[0]['status'] == 'ok'


def test_a_merge_of_ranks_reads_each_ranks_steps_in_order():
    """One spike at step 30 on each of 3 ranks is a spike, not 3 bad steps in a row (was CRITICAL exploding); 8 ranks whose
    scalers each skip their first 12 steps are calibrating, not overflowing (was WARNING skipped: 16 calibration steps
    allowed for all ranks together)."""
    from fastai_gradstats import merge
    norms = [1.0] * 60
    norms[30] = 1e4
    merged = health(merge([event_record(norms, noisy_falling(60)) for _ in range(3)]))
    assert rows(merged, 'exploding').iloc[0]['status'] == 'ok'
    assert rows(merged, 'spikes').iloc[0]['status'] == 'warning' and rows(merged, 'spikes').iloc[0]['first_step'] == 30
    calibrating = merge([event_record([1.0] * 100, noisy_falling(100), skipped=range(12)) for _ in range(8)])
    assert rows(health(calibrating), 'skipped').iloc[0]['status'] == 'ok'


@pytest.mark.parametrize('how', ['median', 'min', 'max'])
def test_per_layer_equals_pandas_groupby_over_the_rows_asked_for(how):
    """`Run.per_layer`, which every check reads, against pandas' groupby over the same rows: finite values only, odd
    and even counts, layers missing at some steps (a phase), a layer left with no finite value, rows of a subset."""
    from fastai_gradstats.health import Run
    rng = np.random.default_rng(3)
    record = GradRecord([{'name': f'l{i}', 'module': 'Linear', 'shape': (4, 4), 'numel': 16, 'depth': 5 - i}
                         for i in range(6)])
    for step in range(41):
        names = [f'l{i}' for i in range(6) if not (i == 2 and step % 3 == 0)]   # l2 is missing at every third step
        values = rng.lognormal(size=(len(names), len(METRICS))).astype(np.float32)
        values[rng.random(len(names)) < 0.2, METRICS.index('grad_norm')] = np.nan
        if 'l4' in names: values[names.index('l4'), METRICS.index('grad_norm')] = np.inf   # no finite value at all
        record.add_step(step, 0, 0.1, 1.0, record.layer_index(names), values, skipped=step == 7)
    run = Run(record, Thresholds())
    for rows in (run.applied_rows, run.applied_rows[run.applied_rows['step'] >= 25]):
        got = run.per_layer('grad_norm', rows=rows, how=how)
        finite = rows[np.isfinite(rows['grad_norm'].astype(float))]
        expected = getattr(finite['grad_norm'].astype(float).groupby(finite['layer'].astype(str)), how)()
        order = [f'l{i}' for i in (5, 3, 2, 1, 0)]   # by depth, l4 (nothing finite) left out
        assert list(got.index) == order
        np.testing.assert_allclose(got.to_numpy(), expected.reindex(order).to_numpy(), rtol=1e-12)
        some = run.per_layer('grad_norm', ['l1', 'l3'], rows=rows, how=how)
        assert list(some.index) == ['l3', 'l1'] and some.to_dict() == pytest.approx(got[['l3', 'l1']].to_dict())
