"""`aggregate.by_module` and `combine`: each group's statistics equal a float64 recomputation from the
raw gradients (and weights) captured at every optimizer step, the group's tensors concatenated."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.basics import Adam, Callback, CrossEntropyLossFlat, DataLoaders, Learner, set_seed
from torch import nn

from fastai_gradstats import GradientAlert, GradRecord, GradStats, load
from fastai_gradstats.aggregate import by_module, combine, module_of
from fastai_gradstats.demo import digits_dls
from helpers import Repair


class Capture(Callback):
    "Gradients and weights before each step, weights after it, and the epoch, as float64 numpy by name."
    order = GradStats.order + 0.2

    def before_fit(self): self.grads, self.before, self.after, self.epochs = [], [], [], []

    def after_backward(self):
        ps = list(self.learn.model.named_parameters())
        self.grads.append({n: p.grad.detach().double().numpy().copy() for n, p in ps})
        self.before.append({n: p.detach().double().numpy().copy() for n, p in ps})
        self.epochs.append(self.learn.epoch)

    def after_step(self):
        self.after.append({n: p.detach().double().numpy().copy() for n, p in self.learn.model.named_parameters()})


class InjectNonfinite(Callback):
    """At step 2, NaN into three elements of the output layer's bias gradient (its weight's stays finite);
    at step 4, +Inf into one element of the middle Linear's weight gradient."""
    order = GradStats.order - 0.3

    def before_fit(self): self.n = 0

    def after_backward(self):
        m = self.learn.model
        if self.n == 2: m[5].bias.grad[:3] = float('nan')
        if self.n == 4: m[3].weight.grad[0, 0] = float('inf')
        self.n += 1


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        m[3].bias[:10] = -20.0   # ten units of the second Linear never fire: dead rows, exact zeros
    return m


def fit(cbs=(), **gradstats):
    dls0 = digits_dls(bs=64, n_train=256)
    set_seed(0)   # the DataLoader draws its shuffling seed when it is made
    dls = DataLoaders.from_dsets(list(dls0.train.dataset), list(dls0.valid.dataset)[:32], bs=64, device=torch.device('cpu'))
    set_seed(0)
    learn = Learner(dls, model(), loss_func=CrossEntropyLossFlat(), opt_func=Adam)
    cap = Capture()
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore', GradientAlert)
        learn.fit(2, 3e-3, cbs=[GradStats(**gradstats), cap, *cbs])
    return learn.grad_stats, cap


@pytest.fixture(scope='module')
def run():
    return fit(update_ratio=True)


@pytest.fixture(scope='module')
def nonfinite_run():
    return fit(cbs=[InjectNonfinite(), Repair()])


def reference(cap, groups, order):
    """One row per (step, group) computed from the captured tensors: the group's gradients concatenated."""
    rows = []
    for step, (grads, before) in enumerate(zip(cap.grads, cap.before)):
        after = cap.after[step] if step < len(cap.after) else None
        for group in order:
            names = [n for n in grads if groups.get(n) == group]
            g = np.concatenate([grads[n].ravel() for n in names])
            w = np.concatenate([before[n].ravel() for n in names])
            matrices = [grads[n] for n in names if grads[n].ndim >= 2]
            units = sum(m.shape[0] for m in matrices)
            dead = sum(int((np.abs(m.reshape(m.shape[0], -1)).max(1) == 0).sum()) for m in matrices)
            row = {'step': step, 'epoch': cap.epochs[step], 'layer': group, 'grad_norm': np.linalg.norm(g),
                   'param_norm': np.linalg.norm(w), 'grad_max': np.abs(g).max(), 'grad_mean': g.mean(),
                   'grad_std': g.std(ddof=1), 'zero_frac': np.mean(g == 0),
                   'dead_frac': dead / units if units else np.nan,
                   'n_nan': int(np.isnan(g).sum()), 'n_inf': int(np.isinf(g).sum())}
            row['grad_param_ratio'] = row['grad_norm'] / row['param_norm']
            row['grad_rms'] = row['grad_norm'] / math.sqrt(g.size)
            if after is not None:
                a = np.concatenate([after[n].ravel() for n in names])
                row['update_ratio'] = np.linalg.norm(a - w) / np.linalg.norm(w)
            rows.append(row)
    return pd.DataFrame(rows)


def check(got, expected, update_ratio=False):
    assert list(got['step']) == list(expected['step'])
    assert list(got['epoch']) == list(expected['epoch'])
    assert list(got['layer'].astype(str)) == list(expected['layer'])
    for col in ('grad_norm', 'param_norm', 'grad_max', 'grad_param_ratio', 'grad_rms', 'grad_std'):
        np.testing.assert_allclose(got[col].to_numpy(float), expected[col].to_numpy(float), rtol=1e-4, err_msg=col)
    # the mean can be near zero: compare on the scale of the gradient's elements
    scale = expected['grad_rms'].to_numpy(float)
    assert np.all(np.abs(got['grad_mean'].to_numpy(float) - expected['grad_mean'].to_numpy(float)) <= 1e-4 * scale)
    np.testing.assert_allclose(got['zero_frac'].to_numpy(float), expected['zero_frac'].to_numpy(float), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got['dead_frac'].to_numpy(float), expected['dead_frac'].to_numpy(float), rtol=1e-6)
    assert list(got['n_nan']) == list(expected['n_nan']) and list(got['n_inf']) == list(expected['n_inf'])
    if update_ratio:
        np.testing.assert_allclose(got['update_ratio'].to_numpy(float), expected['update_ratio'].to_numpy(float), rtol=1e-4)


MODULES = ['0', '1', '3', '5']   # the Linear, BatchNorm1d, Linear, Linear of `model()`, input to output


def test_scenario_has_what_the_aggregation_must_combine(run):
    "The fit has exact zeros, dead rows and 1-D (BatchNorm) parameters, so every rule of `combine` is exercised."
    record, cap = run
    g = cap.grads[-1]
    assert (np.abs(g['3.weight']).max(1) == 0).sum() >= 10   # dead rows
    assert np.mean(g['0.weight'] == 0) > 0.05                 # zero pixels: zero columns
    assert g['1.weight'].ndim == 1 and g['1.bias'].ndim == 1


def test_by_module_equals_the_concatenated_gradients(run):
    record, cap = run
    got = by_module(record)
    groups = {n: n.rsplit('.', 1)[0] for n in cap.grads[0]}
    check(got, reference(cap, groups, MODULES))
    assert list(got.columns) == list(record.df.columns)


def test_combine_with_custom_groups(run):
    "All hidden weights in one group, all hidden biases in another, the output layer left out."
    record, cap = run
    groups = {'0.weight': 'weights', '3.weight': 'weights', '1.weight': 'weights',
              '0.bias': 'biases', '1.bias': 'biases', '3.bias': 'biases'}
    got = combine(record, groups)
    check(got, reference(cap, groups, ['weights', 'biases']))   # ordered by the group's first parameter
    assert not set(got['layer'].astype(str)) & {'5.weight', '5.bias', '5'}


def test_by_module_update_ratio(run):
    """||Δw|| / ||w|| of each module's concatenated weights. At step 0 the BatchNorm bias is all zeros, so its
    own ratio is inf; its update still counts in the module's ||Δw||."""
    record, cap = run
    assert np.linalg.norm(cap.before[0]['1.bias']) == 0 and np.linalg.norm(cap.after[0]['1.bias']) > 0
    check(by_module(record), reference(cap, {n: n.rsplit('.', 1)[0] for n in cap.grads[0]}, MODULES), update_ratio=True)


def test_by_module_update_ratio_after_the_first_step(run):
    "From step 1 on no parameter is all zeros."
    record, cap = run
    got = by_module(record)
    expected = reference(cap, {n: n.rsplit('.', 1)[0] for n in cap.grads[0]}, MODULES)
    later = (expected['step'] > 0).to_numpy()
    check(got[later].reset_index(drop=True), expected[later].reset_index(drop=True), update_ratio=True)


def test_combine_update_ratio_with_custom_groups(run):
    record, cap = run
    groups = {'0.weight': 'weights', '3.weight': 'weights', '1.weight': 'weights',
              '0.bias': 'biases', '1.bias': 'biases', '3.bias': 'biases'}
    check(combine(record, groups), reference(cap, groups, ['weights', 'biases']), update_ratio=True)


def test_combine_one_tensor_per_group_is_the_tensor(run):
    record, cap = run
    groups = {n: n for n in cap.grads[0]}
    order = list(record.layers.sort_values('depth')['name'])
    check(combine(record, groups), reference(cap, groups, order))


def test_scenario_nonfinite(nonfinite_run):
    record, cap = nonfinite_run
    assert np.isnan(cap.grads[2]['5.bias']).sum() == 3 and np.isfinite(cap.grads[2]['5.weight']).all()
    assert np.isinf(cap.grads[4]['3.weight']).sum() == 1 and np.isfinite(cap.grads[4]['3.bias']).all()


def test_by_module_counts_nan_and_inf(nonfinite_run):
    record, cap = nonfinite_run
    got = by_module(record)
    expected = reference(cap, {n: n.rsplit('.', 1)[0] for n in cap.grads[0]}, MODULES)
    assert list(got['n_nan']) == list(expected['n_nan']) and list(got['n_inf']) == list(expected['n_inf'])
    assert expected['n_nan'].sum() == 3 and expected['n_inf'].sum() == 1
    # the steps and modules without NaN/Inf equal the recomputation
    finite = (expected['n_nan'] + expected['n_inf'] == 0).to_numpy()
    check(got[finite].reset_index(drop=True), expected[finite].reset_index(drop=True))


@pytest.mark.parametrize('step, module', [(2, '5'), (4, '3')], ids=['nan', 'inf'])
def test_by_module_does_not_hide_nan_or_inf(nonfinite_run, step, module):
    """A module with a NaN (Inf) gradient element has the statistics of its concatenated gradient: NaN stays
    NaN (as in each tensor's own row), it is not skipped as missing data."""
    record, cap = nonfinite_run
    got = by_module(record)
    row = got[(got['step'] == step) & (got['layer'].astype(str) == module)].iloc[0]
    exp = reference(cap, {n: n.rsplit('.', 1)[0] for n in cap.grads[0]}, [module]).iloc[step]
    with np.errstate(invalid='ignore'):
        for col in ('grad_norm', 'grad_max', 'grad_mean', 'grad_std', 'grad_rms', 'grad_param_ratio'):
            assert not np.isfinite(exp[col])
            assert not np.isfinite(row[col]), f"{col}: {row[col]} where the concatenated gradient gives {exp[col]}"
            if col in ('grad_norm', 'grad_max', 'grad_rms') or np.isnan(exp['grad_norm']):   # NaN stays NaN, Inf stays Inf
                assert (np.isnan(row[col]), np.isposinf(row[col])) == (np.isnan(exp[col]), np.isposinf(exp[col])), \
                    f"{col}: {row[col]} where the concatenated gradient gives {exp[col]}"


def test_by_module_of_a_loaded_record(run, tmp_path):
    record, cap = run
    loaded = load(record.save(tmp_path/'run'))
    groups = {n: n.rsplit('.', 1)[0] for n in cap.grads[0]}
    check(by_module(loaded), reference(cap, groups, MODULES))


def test_module_of():
    assert module_of('body.0.weight') == 'body.0'
    assert module_of('3.bias') == '3'
    assert module_of('weight') == '(model)'
    for bad in (3, None, ('a', 'weight')):
        with pytest.raises(TypeError, match='`name`'): module_of(bad)


def test_errors(run):
    record, _ = run
    with pytest.raises(TypeError):
        by_module(record.df)
    with pytest.raises(ValueError):
        combine(record, {'nope.weight': 'x'})
    layers = [{'name': '0.weight', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': 0}]
    with pytest.raises(ValueError, match='empty'):
        by_module(GradRecord(layers))


def test_by_param_group_follows_the_optimizer_groups():
    "A splitter makes two optimizer groups (body, head); by_param_group equals the float64 recomputation per group."
    from fastai_gradstats.aggregate import by_param_group
    dls0 = digits_dls(bs=64, n_train=128)
    dls = DataLoaders.from_dsets(list(dls0.train.dataset), list(dls0.valid.dataset)[:32], bs=64, device=torch.device('cpu'))
    set_seed(0)
    net = model()
    learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), opt_func=Adam,
                    splitter=lambda m: [list(m[:4].parameters()), list(m[4:].parameters())])
    cap = Capture()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[GradStats(), cap])
    record = learn.grad_stats
    assert list(record.layers.set_index('name')['group'].loc[['0.weight', '3.bias', '5.weight']]) == [0, 0, 1]
    groups = {n: ('group 0' if n.split('.')[0] in ('0', '1', '3') else 'group 1') for n in cap.grads[0]}
    by_group = by_param_group(record)
    check(by_group, reference(cap, groups, ['group 0', 'group 1']))
    # discriminative learning rates: each group's own, as the optimizer held them at that step
    learn.fit(1, slice(1e-4, 1e-2), cbs=[GradStats(), cap := LrCapture()])
    by_group = by_param_group(learn.grad_stats)
    assert by_group.columns[-1] == 'lr'
    np.testing.assert_allclose(by_group['lr'], [lr for lrs in cap.lrs for lr in lrs], rtol=1e-12)
    assert by_group.groupby('layer')['lr'].first().tolist() == pytest.approx([1e-4, 1e-2])


class LrCapture(Callback):
    "Each parameter group's learning rate at every optimizer step."
    def before_fit(self): self.lrs = []
    def before_step(self): self.lrs.append([h['lr'] for h in self.learn.opt.hypers])


def test_a_merge_of_ranks_is_combined_rank_by_rank():
    """Two ranks with different gradients: each rank's modules are combined from its own tensors (not pooled across
    ranks) and keep their `rank`, equal to combining that rank's record alone."""
    from fastai_gradstats import GradRecord, merge
    from fastai_gradstats.stats import METRICS
    layers = [{'name': 'fc.weight', 'module': 'Linear', 'shape': (2, 3), 'numel': 6, 'depth': 0},
              {'name': 'fc.bias', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 1}]
    def one_rank(scale):
        record = GradRecord(layers)
        for step in range(2):
            values = np.full((2, len(METRICS)), 0.25 * scale)
            values[:, METRICS.index('grad_norm')] = [3.0 * scale * (step + 1), 4.0 * scale * (step + 1)]
            values[:, METRICS.index('dead_frac')] = [0.5, np.nan]
            record.add_step(step, 0, 1e-3, 1.0, record.layer_index(['fc.weight', 'fc.bias']), values)
        return record
    ranks = [one_rank(1.0), one_rank(2.0)]
    merged = by_module(merge(ranks))
    assert list(merged[['rank', 'step']].itertuples(index=False, name=None)) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert list(merged.columns[:4]) == ['rank', 'step', 'epoch', 'layer']
    np.testing.assert_allclose(merged['grad_norm'], [5.0, 10.0, 10.0, 20.0])   # sqrt(3^2 + 4^2) per rank, not pooled
    for rank, record in enumerate(ranks):
        alone = by_module(record)
        mine = merged[merged['rank'] == rank].drop(columns='rank').reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone, check_dtype=False)


def test_group_names_must_be_strings():
    "A group name of None or an int (a typo for leaving a parameter out) is a TypeError, not a pandas index error."
    from fastai_gradstats import GradRecord
    from fastai_gradstats.stats import METRICS
    layers = [{'name': 'l.weight', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': 0},
              {'name': 'l.bias', 'module': 'Linear', 'shape': (2,), 'numel': 2, 'depth': 1}]
    record = GradRecord(layers)
    record.add_step(0, 0, 1e-3, 1.0, record.layer_index(['l.weight', 'l.bias']), np.ones((2, len(METRICS))))
    for groups in ({'l.weight': 1, 'l.bias': None}, {'l.weight': 'a', 'l.bias': None}):
        with pytest.raises(TypeError, match='`groups`'): combine(record, groups)
    assert list(combine(record, {'l.weight': 'a', 'l.bias': 'a'})['layer']) == ['a']


def test_groups_are_ordered_by_depth_not_by_first_appearance():
    """The body is frozen for the first two steps (only the head recorded), then trained: at every step the groups
    run from input to output, by the smallest depth of their parameters in the layer table."""
    from fastai_gradstats.stats import METRICS
    names = ['body.0.weight', 'body.0.bias', 'body.1.weight', 'body.1.bias', 'head.weight', 'head.bias']
    layers = [{'name': n, 'module': 'Linear', 'shape': (2, 2) if n.endswith('weight') else (2,),
               'numel': 4 if n.endswith('weight') else 2, 'depth': d} for d, n in enumerate(names)]
    record = GradRecord(layers)
    for step in range(4):
        held = names[2:] if step < 2 else names
        record.add_step(step, 0, 1e-3, 1.0, record.layer_index(held), np.ones((len(held), len(METRICS))))
    assert list(record.df['layer'].astype(str).drop_duplicates()) != names   # recorded out of depth order
    depth = {l['name']: l['depth'] for l in layers}
    custom = {'head.bias': 'late', 'body.1.weight': 'late', 'body.0.bias': 'early', 'head.weight': 'mid'}
    cases = [({n: module_of(n) for n in names}, by_module(record)), (custom, combine(record, custom))]
    for groups, got in cases:
        first = {g: min(depth[n] for n in groups if groups[n] == g) for g in set(groups.values())}
        for step, rows in got.groupby('step'):
            held = {groups[n] for n in (names[2:] if step < 2 else names) if n in groups}
            assert list(rows['layer']) == sorted(held, key=first.get), step
