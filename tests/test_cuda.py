"""GradStats on a CUDA device: skipped where there is none (CI has none; they ran on a lent H200, see
benchmarks/RESULTS_CUDA.md). The CPU tests check the same arithmetic; these check what only a GPU shows:
fastai's own `MixedPrecision` with its CUDA grad scaler, the absence of synchronizing calls, and a model
split between the CPU and a GPU."""
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from fastai.basics import OptimWrapper
from fastai.callback.all import MixedPrecision

from fastai_gradstats import GradStats
import fastai_gradstats.callback as callback_module
import fastai_gradstats.stats as stats_module
from fastai_gradstats.stats import HIST_BINS, METRICS, LayerStats

from helpers import (Capture, OverflowAt, assert_record_matches, assert_stats_close, hist_counts, make_learner, reference_stats,
                     small_dls, tiny_mlp)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def cuda_dls(**kwargs):
    return small_dls(**kwargs).to(torch.device('cuda'))


@pytest.mark.parametrize('kwargs', [{}, {'zero_tol': 1e-3, 'hist': True, 'update_ratio': True}])
def test_record_on_cuda_equals_the_float64_reference(kwargs):
    learn = make_learner(tiny_mlp(), cuda_dls(n_train=64, bs=16))
    cap = Capture()
    learn.fit(2, 0.1, cbs=[GradStats(**kwargs), cap])
    assert next(learn.model.parameters()).is_cuda
    assert_record_matches(learn.grad_stats, cap.captured, zero_tol=kwargs.get('zero_tol', 0.0))
    if kwargs.get('update_ratio'):
        df = learn.grad_stats.df
        by_step = cap.by_step()
        for step in range(len(cap.captured) - 1):   # w_before of the next step is w_after of this one
            rows = df[df['step'] == step].set_index(df[df['step'] == step]['layer'].astype(str))['update_norm']
            for name, before in by_step[step]['params'].items():
                expected = float((by_step[step + 1]['params'][name] - before).norm())
                np.testing.assert_allclose(rows[name], expected, rtol=1e-4, err_msg=f'{name} step {step}')


def test_fastai_mixed_precision_skipped_step_on_cuda():
    """fastai's MixedPrecision with its real CUDA GradScaler: an Inf in a scaled gradient makes the scaler skip
    the step; GradStats records it as skipped, with the unscaled values of the finite tensors."""
    learn = make_learner(tiny_mlp(), cuda_dls(n_train=64, bs=16))
    scaled = Capture(order=MixedPrecision.order - 0.1)
    cap, overflow = Capture(), OverflowAt(at=2)
    learn.fit(1, 0.1, cbs=[MixedPrecision(init_scale=2. ** 10), GradStats(), scaled, cap, overflow])
    record = learn.grad_stats
    assert record.steps['skipped'].tolist() == [False, False, True, False]
    assert_record_matches(record, cap.captured)
    row = record.df.set_index(['step', 'layer']).loc[(2, '2.weight')]
    assert row['n_inf'] == 1 and np.isinf(row['grad_norm'])
    for name in ('0.weight', '0.bias', '2.bias'):  # unscaled: the scaled gradient over the scale
        torch.testing.assert_close(scaled.captured[2]['grads'][name] / 2. ** 10, cap.captured[2]['grads'][name], rtol=1e-6, atol=0)
    for step in range(4):   # the scaler did not apply the skipped step
        same = all(torch.equal(overflow.before[step][n], overflow.after[step][n]) for n in overflow.before[step])
        assert same == (step == 2), f'step {step}'


def test_sync_debug_mode_catches_a_synchronizing_call():
    "The detector the next test relies on: in 'error' mode a call that waits for the device raises."
    x = torch.ones(3, device='cuda')
    torch.cuda.set_sync_debug_mode('error')
    try:
        with pytest.raises(RuntimeError, match='synchronizing'): x.sum().item()
    finally: torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize('kwargs', [{}, {'hist': True, 'update_ratio': True}])
def test_a_recorded_step_synchronizes_only_in_its_one_host_copy(kwargs, monkeypatch):
    """CUDA's sync debug mode 'error' around the whole of GradStats' before_step and after_step, from the second
    step on (the first builds the plan and moves its indices to the device): any call that waits for the device
    raises, except inside the one host copy (`_to_host`), which runs once per step."""
    copies, strict = [], [False]
    to_host = callback_module.steps._to_host
    def counted_copy(tensor):
        copies.append(len(learn.grad_stats))
        torch.cuda.set_sync_debug_mode(0)
        try: return to_host(tensor)
        finally: torch.cuda.set_sync_debug_mode('error' if strict[0] else 0)
    monkeypatch.setattr(callback_module.steps, '_to_host', counted_copy)
    for name in ('before_step', 'after_step'):
        def checked(self, original=getattr(GradStats, name)):
            strict[0] = len(self.record) > 0
            torch.cuda.set_sync_debug_mode('error' if strict[0] else 0)
            try: original(self)
            finally: torch.cuda.set_sync_debug_mode(0); strict[0] = False
        monkeypatch.setattr(GradStats, name, checked)
    graphed, run_graph = [], stats_module._StepGraph.run
    monkeypatch.setattr(stats_module._StepGraph, 'run', lambda *args: graphed.append(run_graph(*args)) or graphed[-1])
    learn = make_learner(tiny_mlp(), cuda_dls(n_train=96, bs=16))
    learn.fit(1, 0.1, cbs=GradStats(**kwargs))
    assert len(learn.grad_stats) == 6
    assert graphed == [False, False, True, True, True, True]   # recorded as a CUDA graph at the third step, under 'error' mode
    extra = [6] if kwargs.get('update_ratio') else []   # the last step's update norms, fetched once after the fit
    assert copies == list(range(6)) + extra, copies     # one copy per recorded step, made while recording it


class SplitModel(nn.Module):
    """Model parallelism: its middle layer on the CPU, the first and last on the GPU. fastai moves each batch to the
    device of the model's first parameter, and its loop moves the model to the data's device: `to` keeps this placement."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle, self.last = nn.Linear(64, 16).cuda(), nn.Linear(16, 16), nn.Linear(16, 10).cuda()
    def to(self, *args, **kwargs): return self
    def forward(self, x): return self.last(self.middle(self.first(x).relu().cpu()).relu().cuda())


@pytest.mark.parametrize('kwargs', [{}, {'hist': True, 'update_ratio': True}])
def test_a_model_split_between_cpu_and_gpu(kwargs):
    learn = make_learner(SplitModel(), cuda_dls(n_train=64, bs=16))
    cap = Capture()
    learn.fit(2, 0.1, cbs=[GradStats(**kwargs), cap])
    assert {p.device.type for p in learn.model.parameters()} == {'cpu', 'cuda'}
    assert_record_matches(learn.grad_stats, cap.captured)
    if kwargs.get('hist'):
        assert (learn.grad_stats.hist[list(HIST_BINS)].sum(axis=1).to_numpy() > 0).all()
    if kwargs.get('update_ratio'):
        df = learn.grad_stats.df
        assert df['update_norm'].notna().all() and (df['update_norm'] > 0).all()


# --- the reductions as a CUDA graph ------------------------------------------------------------------
def cuda_tensors(seed):
    "Gradients of several shapes and dtypes (wide and narrow rows, a 0-d, zeros and small units) and their parameters, on CUDA."
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 3, 3, 3), (64,), (128, 576), (10, 128), (10,), (), (300, 7)]
    grads = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads[0][5] = 0; grads[2][:, 7] = 0; grads[6][2] = 1e-5
    return [g.cuda() for g in grads], [torch.randn(s, generator=gen).cuda() for s in shapes]


def check_step(stats, grads, params, zero_tol, label):
    values, hist, _ = stats._measure(grads, params, [], lambda t: t.cpu().numpy())
    values, counts = stats.refine(values, grads, params)
    for i, (g, p) in enumerate(zip(grads, params)):
        ref = reference_stats(g.cpu(), p.cpu(), zero_tol)
        assert_stats_close(dict(zip(METRICS, values[i].tolist()), n_nan=counts[i, 0], n_inf=counts[i, 1]), ref, f'{label} tensor {i}')
        if hist is not None: assert hist[i].tolist() == hist_counts(g.cpu()).tolist(), f'{label} tensor {i}'


@pytest.mark.parametrize('kwargs', [{}, {'zero_tol': 1e-3}, {'hist': True, 'hist_sample': None}])
def test_graph_replays_the_reductions_of_gradients_written_in_place(kwargs):
    """The same gradient tensors, rewritten in place every step (as fastai's zero_grad leaves them): the reductions
    are captured as a graph at the third step and replayed after it, equal to the float64 reference at every step."""
    grads, params = cuda_tensors(0)
    stats = LayerStats([g.shape for g in grads], **kwargs)
    for step in range(6):
        new_grads, new_params = cuda_tensors(step + 1)
        for g, new in zip(grads, new_grads): g.copy_(new)
        for p, new in zip(params, new_params): p.copy_(new)
        if step == 4: grads[3][0, 0] = float('nan')   # refine still fixes the rows a replay leaves non-finite
        check_step(stats, grads, params, kwargs.get('zero_tol', 0.0), f'step {step}')
        graph = stats._last.graph
        assert (graph.graph is not None) == (step >= 2) and graph.captures == (step >= 2), f'step {step}'


def test_graph_is_dropped_when_the_gradients_move_and_captured_again_when_they_settle():
    grads, params = cuda_tensors(0)
    stats = LayerStats([g.shape for g in grads])
    kept, captures = [], []
    for step in range(9):
        if step in (4, 5):   # new tensors (the old ones kept alive, so the addresses differ), as set_to_none may give
            kept.append(grads); grads = [g.clone() * (step + 1) for g in grads]
        check_step(stats, grads, params, 0.0, f'step {step}')
        captures.append((stats._last.graph.graph is not None, stats._last.graph.captures))
    assert captures == [(False, 0), (False, 0), (True, 1), (True, 1), (False, 1), (False, 1), (False, 1), (True, 2), (True, 2)]


def test_graphs_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(stats_module, 'USE_CUDA_GRAPHS', False)
    grads, params = cuda_tensors(0)
    stats = LayerStats([g.shape for g in grads])
    for step in range(4): check_step(stats, grads, params, 0.0, f'step {step}')
    assert stats._last.graph is None


def test_record_with_an_optimizer_that_sets_gradients_to_none():
    "torch's AdamW through fastai's OptimWrapper: zero_grad sets gradients to None, so backward may put them anywhere."
    learn = make_learner(tiny_mlp(), cuda_dls(n_train=96, bs=16), opt_func=partial(OptimWrapper, opt=torch.optim.AdamW))
    cap = Capture()
    learn.fit(2, 1e-2, cbs=[GradStats(hist=True), cap])
    assert_record_matches(learn.grad_stats, cap.captured)
