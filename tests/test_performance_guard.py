"""What makes GradStats cheap, asserted without timing: one host copy per recorded step, no `.item()`,
work per step that grows with the number of parameter tensors and not with the number of steps,
and bounded memory for long runs (`keep_last`)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fastai.basics import CrossEntropyLossFlat, DataLoaders, Learner
from fastai_gradstats import GradStats, GradRecord, METRICS

from helpers import CallNames

HOST_METHODS = ('cpu', 'item', 'tolist', 'numpy')


def _learner(n_layers=3, width=8, n=256, bs=32):
    torch.manual_seed(0)
    x, y = torch.randn(n, 16), torch.randint(0, 4, (n,))
    layers, d = [], 16
    for _ in range(n_layers - 1): layers += [nn.Linear(d, width), nn.ReLU()]; d = width
    model = nn.Sequential(*layers, nn.Linear(d, 4))
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:bs], y[:bs])), bs=bs, device=torch.device('cpu'))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat())


class _Counting:
    "Counts host transfers (Tensor.cpu/.item/.tolist/.numpy) made while GradStats' own events run."
    def __init__(self, monkeypatch):
        self.active, self.calls = False, {m: 0 for m in HOST_METHODS}
        for m in HOST_METHODS:
            original = getattr(torch.Tensor, m)
            def counted(t, *a, _m=m, _orig=original, **k):
                if self.active: self.calls[_m] += 1
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, m, counted)
        for event in ('before_fit', 'before_train', 'before_step', 'after_step', 'after_cancel_step', 'after_fit'):
            original = getattr(GradStats, event)
            def wrapped(cb, _orig=original):
                self.active = True
                try: return _orig(cb)
                finally: self.active = False
            monkeypatch.setattr(GradStats, event, wrapped)


def test_one_host_copy_per_recorded_step_and_no_item(monkeypatch):
    counter = _Counting(monkeypatch)
    learn = _learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=GradStats())
    n_steps = len(learn.grad_stats)
    assert n_steps == 16
    assert counter.calls['item'] == 0 and counter.calls['tolist'] == 0
    assert counter.calls['cpu'] == n_steps          # exactly one device-to-host copy per recorded step


def test_update_ratio_rides_along_in_the_next_steps_copy(monkeypatch):
    "The update norms, measured on the device after each step, reach the host in the next step's copy (the last at the fit's end)."
    counter = _Counting(monkeypatch)
    learn = _learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=GradStats(update_ratio=True))
    record = learn.grad_stats
    assert counter.calls['cpu'] == len(record) + 1 and counter.calls['item'] == 0
    assert record.df['update_ratio'].notna().all() and not record.pending_last


def test_every_skips_the_work_of_unrecorded_steps(monkeypatch):
    counter = _Counting(monkeypatch)
    learn = _learner()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=GradStats(every=4))
    assert list(learn.grad_stats.steps['step']) == [0, 4, 8, 12]
    assert counter.calls['cpu'] == 4


def _calls_per_step(learn, cb):
    "Names of the torch calls `cb` makes in each `before_step` of a one-epoch fit of `learn`."
    calls, original = [], GradStats.before_step
    def listed(self):
        with CallNames() as c: original(self)
        calls.append(c.names)
    GradStats.before_step = listed
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    finally: GradStats.before_step = original
    return calls


class _Parallel(nn.Module):
    "`n` Linear layers side by side (no depth, so no vanishing gradient triggers `refine`)."
    def __init__(self, n):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(16, 4) for _ in range(n))
    def forward(self, x): return torch.stack([b(x) for b in self.branches]).sum(0)


def _ops_per_step(n_layers, steps=6):
    "Torch calls GradStats makes per recorded step, for each step of a fit."
    learn = _learner(n=32 * steps)
    learn.model = _Parallel(n_layers)
    return [len(names) for names in _calls_per_step(learn, GradStats())]


def test_work_grows_with_tensors_not_with_steps():
    small, large = _ops_per_step(10), _ops_per_step(100)
    # the first step builds the plan; afterwards every step does the same work
    assert len(set(small[1:])) == 1 and len(set(large[1:])) == 1
    tensors_small, tensors_large = 20, 200
    per_tensor = (large[-1] - small[-1]) / (tensors_large - tensors_small)
    assert 1 <= per_tensor <= 20   # a handful of reductions per tensor (attribute reads like p.grad count too) ...
    assert large[-1] <= per_tensor * tensors_large + small[-1]   # ... plus a constant: linear in the tensors


def _synthetic(steps, layers=3, keep_last=None, every=1):
    record = GradRecord([{'name': f'l{i}', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': i} for i in range(layers)],
                        keep_last=keep_last, every=every)
    index = record.layer_index([f'l{i}' for i in range(layers)])
    for s in range(0, steps * every, every):
        values = np.tile(np.arange(len(METRICS), dtype=np.float32), (layers, 1)) + s * 10 + np.arange(layers)[:, None] * 1000
        record.add_step(s, 0, 0.1, float(s), index, values)
    return record


def _expected_kept(last, window, every):
    "The documented rule, computed independently: every step in the window, then multiples of every*2**(k+1)."
    kept = []
    for s in range(0, last + 1, every):
        age = last - s
        if age < window: kept.append(s); continue
        k = int(math.floor(math.log2(age / window)))
        if s % (every * 2 ** (k + 1)) == 0: kept.append(s)
    return kept


@pytest.mark.parametrize('every', [1, 3])
def test_keep_last_keeps_the_documented_steps(every):
    record = _synthetic(5000, keep_last=50, every=every)
    last = (5000 - 1) * every
    steps = record.steps
    assert list(steps['step']) == _expected_kept(last, 50 * every, every)
    assert len(steps) < 50 + 50 * math.ceil(math.log2(5000 / 50))   # bounded: window + half a window per octave of age
    # kept steps are untouched, and .df agrees with .steps
    df = record.df
    assert set(df['step']) == set(steps['step'])
    expected = df['step'].to_numpy() * 10.0 + df['layer'].cat.codes.to_numpy().astype(np.int64) * 1000
    np.testing.assert_array_equal(df['grad_norm'].to_numpy(), expected.astype(np.float32))
    np.testing.assert_array_equal(steps['loss'].to_numpy(), steps['step'].to_numpy().astype(np.float32))
    assert (steps.loc[steps['step'] > last - 50 * every, 'kept_every'] == every).all()
    assert (steps['kept_every'] >= every).all()


def test_keep_last_memory_bound_for_a_million_steps():
    "1,000,000 steps x 50 layers with keep_last=10,000 keeps a bounded number of steps (< 1 GB with histograms)."
    kept = _expected_kept(1_000_000 - 1, 10_000, 1)
    bytes_per_row = 4 * len(METRICS) + 8 * 2 + 4 + 2 * 25   # values, NaN/Inf counts, layer index, uint16 histogram
    assert len(kept) * 50 * bytes_per_row < 1e9
    record = _synthetic(30_000, layers=2, keep_last=1000)
    assert len(record) <= len(_expected_kept(29_999, 1000, 1)) + 1000 // 4


def test_default_metrics_are_compact():
    record = _synthetic(10)
    per_row = (record._values.data.itemsize * record._values.data.shape[1] + record._counts.data.itemsize * 2
               + record._row_layer.data.itemsize)
    assert per_row <= 64


def test_a_growing_record_allocates_at_most_a_quarter_more_than_it_uses():
    """While steps are added, one at a time or in batches, the arrays the record allocates (not only those it uses) stay
    within a quarter above what they use, about 74 bytes per (step, layer) of 20 layers (56 used per (step, layer): nine
    float32 statistics, two int64 counts, an int32 layer index; 57 per step, the square of its total norm among them),
    once past their first few hundred rows, and nothing is lost on the way."""
    layers = 20
    record = GradRecord([{'name': f'l{i}', 'module': 'Linear', 'shape': (2, 2), 'numel': 4, 'depth': i} for i in range(layers)])
    index = record.layer_index([f'l{i}' for i in range(layers)])
    worst, step = 0.0, 0
    for batch in [1] * 300 + [16] * 200 + [1] * 300 + [16] * 300:
        if batch == 1:
            record.add_step(step, 0, 0.1, 1.0, index, np.full((layers, len(METRICS)), step, np.float32))
        else:
            steps = {'step': np.arange(step, step + batch), 'epoch': np.zeros(batch, np.int32), 'lr': np.full(batch, 0.1),
                     'loss': np.ones(batch, np.float32), 'skipped': np.zeros(batch, bool)}
            values = np.repeat(np.arange(step, step + batch, dtype=np.float32), layers)[:, None].repeat(len(METRICS), 1)
            record._extend(steps, np.full(batch, layers), np.tile(index, batch), values, np.zeros((batch * layers, 2), np.int64))
        step += batch
        allocated = sum(a.data.nbytes for a in (record._values, record._counts, record._row_layer, *record._step_cols.values()))
        if step >= 50: worst = max(worst, allocated / (step * layers))
    used = sum(a.view.nbytes for a in (record._values, record._counts, record._row_layer, *record._step_cols.values()))
    assert used / (step * layers) == pytest.approx(56 + 57 / layers)
    assert 56 <= worst <= 1.25 * (56 + 57 / layers) + 0.1
    assert record.steps['step'].tolist() == list(range(step))
    # every layer's norm at step s is s: the total norm, kept per step as the steps arrived, is s * sqrt(layers)
    np.testing.assert_allclose(record.steps['grad_norm'].to_numpy(), np.arange(step) * np.sqrt(layers), rtol=1e-12)
    np.testing.assert_array_equal(record.df.groupby('step', observed=True)['grad_norm'].first().to_numpy(), np.arange(step))


def test_gradstats_keep_last_argument():
    learn = _learner(n=32 * 40)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=GradStats(keep_last=8))
    steps = learn.grad_stats.steps
    assert list(steps['step']) == _expected_kept(39, 8, 1)
    with pytest.raises(ValueError, match='`keep_last`'): GradStats(keep_last=0)
    for bad in (2.5, '8', True):
        with pytest.raises(TypeError, match='`keep_last`'): GradStats(keep_last=bad)
    assert GradStats(keep_last=np.int64(8)).record.keep_last == 8


# Calls that make a CUDA device wait for the host or the host for the device (besides the one copy).
SYNCING = {'item', 'tolist', 'nonzero', 'argwhere', 'bincount', 'unique', 'unique_consecutive', 'masked_select',
           'repeat_interleave', '__bool__', '__int__', '__float__', '__index__', 'equal', 'allclose', 'is_nonzero'}


@pytest.mark.parametrize('kwargs', [{}, {'hist': True, 'zero_tol': 1e-3}])
def test_recorded_steps_make_no_call_that_would_sync_a_cuda_device(kwargs):
    """On CUDA every host read waits for the device: the steady-state step must make no such call (no
    `.item()`, `bincount`, `nonzero`, boolean indexing, ...) other than its one `.cpu()`. Checked on CPU by
    listing the torch calls the callback makes (the data is the same on any device)."""
    calls = _calls_per_step(_learner(n=32 * 4), GradStats(**kwargs))
    for names in calls[1:]:   # the first step also builds the plan (once)
        assert not SYNCING & set(names), SYNCING & set(names)
        assert names.count('cpu') == 1 and names.count('numpy') == 1   # .cpu().numpy(): the host copy, then a view of it
