"""The diagnosis judged on what it is for (issue 24): no false alarm on healthy runs, the fault named first.

The labelled suite's quick subset (`benchmarks/diagnosis.py --quick`: real fastai fits, each labelled by evidence
measured outside fastai_gradstats) must meet its targets; then one test per false-alarm guard, on a small fit or a
hand-built record that used to fire, and per new fault check, on a small fit whose fault is known by construction.
"""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from fastai.basics import Adam, CrossEntropyLossFlat, Learner, params, set_seed
from fastai.callback.all import GradientClip  # noqa: F401  (also adds fit_one_cycle)

from fastai_gradstats import GradientAlert, GradRecord, GradStats
from fastai_gradstats.stats import METRICS

from helpers import digits, quiet, tiny_mlp

sys.path.insert(0, str(Path(__file__).parent.parent/'benchmarks'))
import diagnosis  # noqa: E402  (the labelled suite)


def problems(record):
    table = record.health()
    return table[table['status'] != 'ok']


def first_check(record):
    return diagnosis._check_of(diagnosis.first_problem(record.summary()))


def train(model, dls=None, lr=3e-3, epochs=2, opt=Adam, loss=None, cbs=(), splitter=None, **gradstats):
    set_seed(0)
    kwargs = {} if splitter is None else {'splitter': splitter}
    learn = quiet(Learner(dls or digits(512), model, loss_func=loss or CrossEntropyLossFlat(), opt_func=opt, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)
        learn.fit(epochs, lr, cbs=[GradStats(**gradstats), *cbs])
    return learn


# --- the labelled suite ------------------------------------------------------------------------------------------
def test_the_suites_quick_subset_meets_its_targets():
    """Healthy runs: no critical, at most one warning; faults: named on the first problem line (with their layer), with
    a remedy that fits; every label confirmed by its own evidence."""
    rows = diagnosis.run_suite(quick=True)
    ran = [r for r in rows if r['skipped'] is None]
    assert len(ran) >= 10 and {r['label'] for r in ran} > {'healthy'}
    assert not [r['error'] for r in ran if r['error']]
    assert all(r['label_holds'] for r in ran), [r['name'] for r in ran if not r['label_holds']]
    missed = {r['name']: r['first_line'] for r in ran if not r['passed']}
    assert not missed, missed


# --- hand-built records --------------------------------------------------------------------------------------------
def record_of(layers, steps, extra_columns=()):
    """A record of `layers` (name -> shape; module 'Embedding' for names starting 'emb', else 'Linear') and `steps`: a
    list of (loss, {name: {metric: value}}) with defaults grad_norm 0.1, param_norm 1, unit_spread 0.5, others 0."""
    table = [{'name': n, 'module': 'Embedding' if n.startswith('emb') else 'Linear', 'shape': shape,
              'numel': int(np.prod(shape)), 'depth': i, 'group': 0, 'requires_grad': True}
             for i, (n, shape) in enumerate(layers.items())]
    record = GradRecord(table, extra_columns=extra_columns)
    columns = list(METRICS) + list(extra_columns)
    for step, (loss, values) in enumerate(steps):
        names = list(values)
        rows = np.zeros((len(names), len(columns)))
        for i, n in enumerate(names):
            row = {'grad_norm': 0.1, 'param_norm': 1.0, 'unit_spread': 0.5, **values[n]}
            for column, v in row.items(): rows[i, columns.index(column)] = v
        record.add_step(step, 0, 1e-3, loss, record.layer_index(names), rows)
    return record


def falling(n, start=2.3, end=0.3):
    return list(np.geomspace(start, end, n))


def test_zeros_every_live_unit_shares_are_structure_not_a_problem():
    """A 3x3 convolution on a 1x1 feature map (88.9% zero, all at positions every live unit shares) and a first layer on
    inputs that are always zero (30% zero: 16% shared, 14% dead units that come and go): 'ok', each zero attributed.
    Both were criticals; scattered zeros inside live units (60%) still warn."""
    layers = {'conv': (8, 8, 3, 3), 'first': (64, 64), 'out': (10, 64)}
    n = 40
    steps = [(loss, {'conv': {'zero_frac': 8 / 9, 'shared_zero_frac': 8 / 9},
                     'first': {'zero_frac': 0.30, 'shared_zero_frac': 0.16, 'dead_frac': 0.14 if s % 2 else 0.0},
                     'out': {}}) for s, loss in enumerate(falling(n))]
    table = record_of(layers, steps).health()
    zeros = table[table['check'] == 'zero_frac'].set_index('layer')
    assert (zeros['status'] == 'ok').all() and {'conv', 'first'} <= set(zeros.index)
    assert 'kernel positions outside a small feature map' in zeros.loc['conv', 'reason']
    assert (table['status'] == 'ok').all(), table[table['status'] != 'ok']
    scattered = [(loss, {'conv': {'zero_frac': 0.6}, 'first': {}, 'out': {}}) for loss in falling(n)]
    row = record_of(layers, scattered).health().query("check == 'zero_frac' and layer == 'conv'").iloc[0]
    assert row['status'] == 'warning' and row['value'] == pytest.approx(0.6) and 'scattered' in row['reason']


def test_embedding_rows_without_a_gradient_are_how_embeddings_learn():
    "An embedding table whose rows of categories not in the batch get no gradient: dead_frac and zero_frac 0.7, all 'ok'."
    layers = {'emb.weight': (100, 8), 'lin': (10, 8)}
    steps = [(loss, {'emb.weight': {'zero_frac': 0.7, 'dead_frac': 0.7}, 'lin': {}}) for loss in falling(40)]
    table = record_of(layers, steps).health()
    assert (table['status'] == 'ok').all(), table[table['status'] != 'ok']
    assert 'embedding' in table.query("check == 'zero_frac'").iloc[0]['reason']


def test_a_jump_when_more_tensors_train_is_not_an_explosion():
    """fine_tune: 10 steps of a head alone (total norm 1), then the body too (norm 30, as 20 more tensors add to it):
    no explosion, the two phases compared apart. The same jump with the same tensors is one."""
    layers = {'body': (64, 64), 'head': (10, 64)}
    frozen = [(2.3 - 0.05 * s, {'head': {'grad_norm': 1.0}}) for s in range(10)]
    unfrozen = [(1.8 - 0.05 * s, {'body': {'grad_norm': 30.0}, 'head': {'grad_norm': 1.0}}) for s in range(20)]
    table = record_of(layers, frozen + unfrozen).health()
    row = table.query("check == 'exploding'").iloc[0]
    assert row['status'] == 'ok' and '2 phases' in row['reason']
    same = frozen + [(loss, {'head': {'grad_norm': 30.0}}) for loss, _ in unfrozen]
    assert record_of(layers, same).health().query("check == 'exploding'").iloc[0]['status'] == 'critical'


def test_a_large_healthy_norm_is_no_finding():
    "A total norm of 40-60 at every step (a wide model), neither growing nor NaN, with a falling loss: nothing to report."
    rng = np.random.default_rng(0)
    steps = [(loss, {'w0': {'grad_norm': 40 + 20 * rng.random()}, 'w1': {'grad_norm': 5.0}}) for loss in falling(60)]
    table = record_of({'w0': (512, 64), 'w1': (10, 512)}, steps).health()
    assert (table['status'] == 'ok').all(), table[table['status'] != 'ok']
    assert table.query("check == 'total_norm'").iloc[0]['value'] > 40


def test_skipped_steps_after_the_scalers_calibration_are_judged():
    "Leading skips are the grad scaler calibrating (ok); skipping most steps after it throws the updates away (critical)."
    def skipping(pattern):
        record = GradRecord([{'name': 'w', 'module': 'Linear', 'shape': (8, 8), 'numel': 64, 'depth': 0}])
        values = np.zeros((1, len(METRICS))); values[0, :2] = 0.1, 1.0
        for step, skip in enumerate(pattern):
            record.add_step(step, 0, 1e-3, 2.3 - 0.02 * step, record.layer_index(['w']), values, skipped=skip)
        return record.health().query("check == 'skipped'").iloc[0]
    assert skipping([True] * 6 + [False] * 54)['status'] == 'ok'
    row = skipping([True] * 6 + [s % 5 != 0 for s in range(54)])
    assert row['status'] == 'critical' and row['value'] == pytest.approx(43 / 54)
    assert skipping([True] * 6 + [s % 6 == 0 for s in range(54)])['status'] == 'warning'


# --- small fits ------------------------------------------------------------------------------------------------------
def test_a_two_class_output_is_not_symmetric_but_a_constant_init_is():
    """The two outputs of a softmax get gradients that are each other's negatives (equal norms): not symmetric units.
    Hidden units initialised to one constant are, and the summary says so first."""
    two = torch.nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
    dls = digits(512)
    dls.train.dataset = [(x, y % 2) for x, y in dls.train.dataset]; dls.valid.dataset = [(x, y % 2) for x, y in dls.valid.dataset]
    record = train(two, dls).grad_stats
    assert record.df.query("layer == '2.weight'")['unit_spread'].min() > 1e-2
    assert 'symmetric' not in set(problems(record)['check'])
    constant = tiny_mlp()   # every weight one constant: each hidden unit sees and sends the same, and stays a copy
    with torch.no_grad():
        for layer in (constant[0], constant[2]): layer.weight.fill_(0.05); layer.bias.zero_()
    record = train(constant).grad_stats
    assert first_check(record) == 'symmetric' and problems(record).iloc[0]['layer'] == '0.weight'


def test_a_summed_loss_is_named_with_the_batch_size():
    "CrossEntropy with reduction='sum' over batches of 64: loss_scale, naming the batch size (the norms are not an explosion)."
    record = train(tiny_mlp(), loss=nn.CrossEntropyLoss(reduction='sum')).grad_stats
    assert first_check(record) == 'loss_scale'
    row = problems(record).iloc[0]
    assert row['value'] == 64 and "reduction='sum'" in row['reason']
    assert 'exploding' not in set(problems(record)['check'])


def test_a_learning_rate_far_too_low_is_named_and_not_told_to_clip():
    record = train(tiny_mlp(), lr=1e-7).grad_stats
    line = diagnosis.first_problem(record.summary())
    assert first_check(record) == 'lr_too_low' and 'clip' not in line.lower() and 'raise it' in line
    assert record.health().query("check == 'not_learning'").iloc[0]['status'] == 'ok'   # explained by lr_too_low


def test_labels_without_signal_are_not_learning():
    "Random labels: the loss stays at ln 10 with normal gradients and steps: not_learning, critical, at chance."
    dls = digits(512)
    g = torch.Generator().manual_seed(1)
    dls.train.dataset = [(x, torch.randint(0, 10, (), generator=g)) for x, _ in dls.train.dataset]
    record = train(tiny_mlp(width=32), dls, epochs=3).grad_stats
    assert first_check(record) == 'not_learning'
    row = problems(record).iloc[0]
    assert row['status'] == 'critical' and 'ln 10' in row['reason'] and 'raise' not in row['reason']


class WithUnused(nn.Module):
    "An MLP with a layer that is built (and optimised) but never called in forward."
    def __init__(self):
        super().__init__()
        self.body, self.extra = tiny_mlp(), nn.Linear(10, 10)
    def forward(self, x): return self.body(x)


def test_a_parameter_that_never_gets_a_gradient_is_named():
    record = train(WithUnused(), lr=1e-2, epochs=3).grad_stats
    assert record.steps['loss'].iloc[-5:].mean() < 0.8 * record.steps['loss'].iloc[0]   # it trains otherwise
    assert first_check(record) == 'no_gradient'
    assert set(problems(record).query("check == 'no_gradient'")['layer']) == {'extra.weight', 'extra.bias'}


def test_tensors_outside_every_optimizer_group_are_named_and_their_growing_gradient_is_not_an_explosion():
    """A splitter that leaves `extra` out: its gradients are never zeroed and add up step after step; it never trains.
    not_in_optimizer names it first; the norms the optimizer uses do not explode."""
    class Used(WithUnused):
        def forward(self, x): return self.body(x) + self.extra(self.body(x))
    learn = train(Used(), epochs=3, splitter=lambda m: [params(m.body)])
    record = learn.grad_stats
    assert first_check(record) == 'not_in_optimizer'
    assert set(problems(record).query("check == 'not_in_optimizer'")['layer']) == {'extra.weight', 'extra.bias'}
    extra = record.df.query("layer == 'extra.weight'")['grad_norm'].to_numpy()
    assert extra[-1] > 5 * extra[0]                                          # the scenario: it adds up
    assert 'exploding' not in set(problems(record)['check'])


def test_weights_that_do_not_move_are_named_with_update_ratio():
    "The body's parameter group trains at lr 0 (update_ratio recorded): update_ratio names the body's weights first."
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10))
    set_seed(0)
    learn = quiet(Learner(digits(512), model, loss_func=CrossEntropyLossFlat(), opt_func=Adam,
                          splitter=lambda m: [params(m[0]), params(m[1])]))
    learn.fit(2, [0.0, 3e-3], cbs=GradStats(update_ratio=True))
    record = learn.grad_stats
    assert first_check(record) == 'update_ratio'
    assert set(problems(record).query("check == 'update_ratio'")['layer']) == {'0.0.weight'}


def test_spikes_under_gradient_clip_are_capped_not_a_warning():
    """Outlier batches (inputs x20 every 10th batch): spikes warn; with GradientClip among the fit's callbacks they are
    what it caps, said so, and no warning."""
    dls = digits(512, bs=32)
    data = list(dls.train.dataset)
    dls.train.dataset = [(x * (20 if i // 32 % 5 == 4 else 1), y) for i, (x, y) in enumerate(data)]
    dls.train.shuffle = False
    plain = train(tiny_mlp(), dls, lr=1e-3).grad_stats
    assert plain.health().query("check == 'spikes'").iloc[0]['status'] == 'warning'
    clipped = train(tiny_mlp(), dls, lr=1e-3, cbs=[GradientClip(max_norm=1.0)]).grad_stats
    row = clipped.health().query("check == 'spikes'").iloc[0]
    assert row['status'] == 'ok' and 'GradientClip(max_norm=1)' in row['reason']
