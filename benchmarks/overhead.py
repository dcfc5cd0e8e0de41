"""How much does gradient monitoring slow a fastai training step? `python benchmarks/overhead.py [--quick]`

For each workload the same `Learner` trains the same batches from the same initial weights,
once per monitor per round, in interleaved rounds (the monitor order rotates every round).
Each fit's time is its number of training batches times their median duration (before_batch
to after_batch, validation excluded): robust to the odd slow batch. The result per monitor is the median over rounds of time(with) / time(without),
with the none-vs-none ratio as the noise floor. Also measured: the physical floor (one
batched `torch._foreach_norm` read of all gradients and parameters with one host copy), the
memory a monitor keeps, and how GradStats' cost per step grows with the number of layers.
Writes the table to benchmarks/RESULTS.md (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastai.basics import Callback, CrossEntropyLossFlat, DataLoaders, Learner, SGD, Adam
from fastai.callback.hook import ActivationStats
from fastai.layers import ConvLayer, ResBlock

import fastai_gradstats
from fastai_gradstats import METRICS, GradRecord, GradStats
from fastai_gradstats.demo import digits_dls

warnings.filterwarnings('ignore')


# --- workloads -----------------------------------------------------------------------------
def digits_repeated(bs=64, times=5):
    "The digits training images repeated `times` times (enough batches for 100 steps), the usual validation set."
    from fastai_gradstats.demo import TensorPairs
    base = digits_dls(bs=bs)
    train, valid = base.train.dataset, base.valid.dataset
    big = TensorPairs(train.x.repeat(times, 1), train.y.repeat(times))
    return DataLoaders.from_dsets(big, valid, bs=bs, device=torch.device('cpu'))


def mlp_workload(depth=10, width=256):
    layers, n = [], 64
    for _ in range(depth): layers += [nn.Linear(n, width), nn.ReLU()]; n = width
    return nn.Sequential(*layers, nn.Linear(n, 10)), digits_repeated()


def cnn_workload():
    dls = digits_repeated()
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), ConvLayer(1, 32), ResBlock(1, 32, 32), ResBlock(1, 32, 64, stride=2),
                          ResBlock(1, 64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return model, dls


class TinyTransformer(nn.Module):
    def __init__(self, vocab=32, d=64, layers=2, seq=32):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(seq, d) * 0.02)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True), layers,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x): return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def transformer_workload():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (3264, 32), generator=g)
    y = (x[:, :4].sum(1) % 10)
    from fastai_gradstats.demo import TensorPairs
    dls = DataLoaders.from_dsets(TensorPairs(x[:3200], y[:3200]), TensorPairs(x[3200:], y[3200:]), bs=32,
                                 device=torch.device('cpu'))
    return TinyTransformer(), dls


WORKLOADS = {'mlp 10x256': mlp_workload, 'cnn resblocks': cnn_workload, 'transformer 2 layers': transformer_workload}


# --- monitors --------------------------------------------------------------------------------
class Floor(Callback):
    "The physical floor: one batched read of every gradient and parameter, one host copy per step."
    order = GradStats.order
    def before_step(self):
        ps = [p for p in self.learn.model.parameters() if p.grad is not None]
        torch.stack(torch._foreach_norm([p.grad for p in ps]) + torch._foreach_norm(ps)).cpu()


class NaiveItem(Callback):
    "What forum posts do: loop over parameters, one `.item()` per statistic."
    order = GradStats.order
    def before_fit(self): self.rows = []
    def before_step(self):
        for name, p in self.learn.model.named_parameters():
            if p.grad is None: continue
            g = p.grad
            self.rows.append((name, g.norm().item(), p.norm().item(), g.abs().max().item(), g.mean().item(),
                              g.std().item(), (g == 0).float().mean().item(), torch.isnan(g).sum().item()))


class LightningGradNorm(Callback):
    "Lightning's `grad_norm` utility called every step, as its docs show in `on_before_optimizer_step`."
    order = GradStats.order
    def __init__(self, fn): self.fn = fn
    def before_fit(self): self.rows = []
    def before_step(self): self.rows.append(self.fn(self.learn.model, norm_type=2))


class WandbWatch(Callback):
    "W&B's `wandb.watch(model, log='all', log_freq=1)` in offline mode; hooks log at every step."
    def __init__(self, wandb, tmp): self.wandb, self.tmp = wandb, tmp
    def before_fit(self):
        # not `self.run`: fastai's Callback.run switches a callback off
        self.wandb_run = self.wandb.init(mode='offline', dir=self.tmp, reinit=True, settings=self.wandb.Settings(silent=True))
        self.wandb.watch(self.learn.model, log='all', log_freq=1)
    def after_batch(self):
        if self.training: self.wandb.log({'loss': float(self.learn.loss)})
    def after_fit(self):
        self.wandb.unwatch(self.learn.model); self.wandb_run.finish()


class TensorboardHist(Callback):
    "TensorBoard per-parameter gradient histograms and norms with `SummaryWriter`, every step."
    order = GradStats.order
    def __init__(self, writer_cls, tmp): self.writer_cls, self.tmp = writer_cls, tmp
    def before_fit(self): self.writer, self.n = self.writer_cls(self.tmp), 0
    def before_step(self):
        for name, p in self.learn.model.named_parameters():
            if p.grad is None: continue
            self.writer.add_histogram(f'grad/{name}', p.grad, self.n)
            self.writer.add_scalar(f'grad_norm/{name}', p.grad.norm(), self.n)
        self.n += 1
    def after_fit(self): self.writer.close()


def _lightning_grad_norm():
    """Lightning's `grad_norm` (lightning/pytorch/utilities/grads.py, pure torch). Importing `lightning.pytorch`
    pulls torchmetrics and torchvision, which cannot import on a CPU-only torch here, so the module file is
    loaded on its own when the package import fails."""
    try:
        from lightning.pytorch.utilities import grad_norm
        return grad_norm
    except ImportError:
        import importlib.util
        spec = importlib.util.find_spec('lightning')
        if spec is None: raise
        path = os.path.join(spec.submodule_search_locations[0], 'pytorch', 'utilities', 'grads.py')
        module_spec = importlib.util.spec_from_file_location('lightning_grads', path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.grad_norm


def monitors(tmp):
    "Name -> factory of a fresh callback (or None), with the peers that are not installed marked unavailable."
    found = {'none': lambda: None, 'floor (foreach_norm, 1 copy)': Floor,
             'GradStats() defaults': GradStats,
             'GradStats(hist=True)': lambda: GradStats(hist=True),
             'GradStats(every metric on)': lambda: GradStats(hist=True, update_ratio=True),
             'fastai ActivationStats': lambda: ActivationStats(with_hist=False),
             'naive .item() loop': NaiveItem}
    unavailable = {}
    try:
        found["Lightning grad_norm"] = (lambda fn: lambda: LightningGradNorm(fn))(_lightning_grad_norm())
    except Exception as e: unavailable['Lightning grad_norm'] = f'not available ({type(e).__name__}: {e})'
    try:
        from torch.utils.tensorboard import SummaryWriter
        found['TensorBoard histograms'] = lambda: TensorboardHist(SummaryWriter, tmp)
    except Exception as e: unavailable['TensorBoard histograms'] = f'not installed ({type(e).__name__})'
    try:
        import wandb
        os.environ.setdefault('WANDB_SILENT', 'true')
        found['wandb.watch(log="all", log_freq=1)'] = lambda: WandbWatch(wandb, tmp)
    except Exception as e: unavailable['wandb.watch(log="all", log_freq=1)'] = f'not installed ({type(e).__name__})'
    return found, unavailable


# --- timing ------------------------------------------------------------------------------------
class BatchTimer(Callback):
    """Wall time of each training batch, validation excluded: from the start of before_batch (this callback
    runs first) to the end of after_batch (its `BatchEnd` runs last, so a monitor's own after_batch counts).
    A fit's time is `n` times the median batch, robust to the odd slow batch (garbage collection, the data
    loader, another process) that makes sums noisy on a small machine, plus the monitor's own time above its
    median in every batch but the first: work a monitor does every few steps (GradStats assembles the steps it
    keeps every 16 steps) would hide from the median alone, while the first step's setup is a one-time cost.
    `own` collects, per training batch, the time spent inside the monitor's own code (`watch`)."""
    order = -100
    def __init__(self): self.times, self.own, self.clock = [], [], [0.0]
    def before_fit(self): self.times, self.own = [], []
    def before_batch(self):
        if self.training: self.clock[0], self.t0 = 0.0, time.perf_counter()
    def end(self):
        if self.training: self.times.append(time.perf_counter() - self.t0); self.own.append(self.clock[0])
    @property
    def n(self): return len(self.times)
    @property
    def own_per_step(self) -> float:
        "The monitor's own time per step, first step left out: the mean (what periodic work costs per step)."
        return float(np.mean(self.own[1:])) if len(self.own) > 1 else 0.0
    @property
    def total(self):
        if not self.times: return 0.0
        own = np.asarray(self.own[1:])
        excess = float(np.sum(own - np.median(own))) if len(own) else 0.0  # periodic work the median step leaves out
        return float(np.median(self.times)) * len(self.times) + max(0.0, excess)


class BatchEnd(Callback):
    "Stops its `BatchTimer` after every other callback's after_batch."
    order = 10_000
    def __init__(self, timer): self.timer = timer
    def after_batch(self): self.timer.end()


TRAIN_EVENTS = ('before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step',
                'after_step', 'after_batch', 'hook')
"Per-batch fastai events (and `hook`, the forward hook of fastai's HookCallbacks) whose time counts as a monitor's own."


def watch(cb, clock):
    """Time `cb`'s own per-batch code into `clock[0]`: its methods for `TRAIN_EVENTS` are wrapped on the instance
    (fastai looks events up with getattr, and HookCallback registers `self.hook` at before_fit). Code a monitor
    runs elsewhere (wandb's own autograd hooks, background writer threads) is not seen: those rows say so."""
    for event in TRAIN_EVENTS:
        if not callable(getattr(type(cb), event, None)): continue
        def timed(*args, _method=getattr(cb, event), **kwargs):
            start = time.perf_counter()
            try: return _method(*args, **kwargs)
            finally: clock[0] += time.perf_counter() - start
        object.__setattr__(cb, event, timed)  # not Callback.__setattr__, which looks the name up on the Learner
    return cb


def make_learner(workload, n_batches):
    torch.manual_seed(0)
    model, dls = WORKLOADS[workload]()
    dls.train.n = min(dls.train.n, n_batches * dls.train.bs)  # the same first n_batches batches every fit
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-3)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == 'ProgressCallback'])
    return learn, {k: v.clone() for k, v in model.state_dict().items()}


def timed_fit(learn, state, cb, seed=0):
    "One fit: (its time, its number of training steps, the mean time per step inside `cb`'s own code, first step left out)."
    learn.model.load_state_dict(state)
    learn.opt = None  # a fresh optimizer each fit: same starting point for every monitor
    timer = BatchTimer()
    if cb is not None: watch(cb, timer.clock)
    torch.manual_seed(seed)
    with learn.no_logging(), contextlib.redirect_stdout(io.StringIO()):
        learn.fit(1, cbs=[timer, BatchEnd(timer)] + ([cb] if cb is not None else []))
        learn.dls.valid  # validation runs but is not timed
    return timer.total, timer.n, timer.own_per_step


def bench_workload(workload, factories, rounds, n_batches):
    """Per monitor: the median over rounds of time(with) / time(without), and of its own time per step (seconds);
    and the median step time without a monitor."""
    learn, state = make_learner(workload, n_batches)
    names = list(factories)
    for name in names: timed_fit(learn, state, factories[name]())  # warm-up: allocations, first-call costs
    times, own = {n: [] for n in names + ['none (again)']}, {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            total, _, own_time = timed_fit(learn, state, factories[name]())
            times[name].append(total); own[name].append(own_time)
        times['none (again)'].append(timed_fit(learn, state, None)[0])
    base = np.array(times['none'])
    ratios = {n: float(np.median(np.array(t) / base)) for n, t in times.items()}
    steps = timed_fit(learn, state, None)[1]
    return ratios, {n: float(np.median(t)) for n, t in own.items()}, float(np.median(base)) / steps


def kept_memory(workload, factory, n_batches):
    "Bytes a monitor allocated and still holds after one fit (Python and numpy, plus torch tensors it keeps)."
    learn, state = make_learner(workload, n_batches)
    cb = factory()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    timed_fit(learn, state, cb)
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = after - before
    if isinstance(cb, GradStats):
        held = sum(a.data.nbytes for a in _record_arrays(learn.grad_stats))
    return held, peak - before


def work_buffer_bytes(workload):
    "Bytes of the work buffer GradStats holds while fitting this workload (freed after the fit)."
    from fastai_gradstats import LayerStats
    model, _ = WORKLOADS[workload]()
    params = list(model.parameters())
    plan = LayerStats([p.shape for p in params])
    with torch.no_grad(): plan.collect([torch.zeros_like(p) for p in params], params)
    return plan.work_bytes


def _record_arrays(record):
    yield record._values; yield record._counts; yield record._row_layer
    yield from record._step_cols.values()
    if record._hist is not None: yield record._hist


# --- a long run's record -------------------------------------------------------------------------
def record_at_scale(n_steps, n_layers, batch=1000, seed=0):
    """A record of `n_steps` x `n_layers` with the default statistics, filled `batch` steps at a time through
    `GradRecord._extend` (GradStats adds its waiting steps through it, 16 at a time), and the time to build its `.df`
    and `.steps`: `(bytes allocated, bytes used, seconds for .df, seconds for .steps)`, the times the median of 3 builds
    from scratch (the cache cleared in between). Its arrays grow by a quarter at a time, so what is allocated may exceed
    what is used by a quarter."""
    rng = np.random.default_rng(seed)
    record = GradRecord([{'name': f'layer{i}.weight', 'module': 'Linear', 'shape': (64, 64), 'numel': 4096, 'depth': i}
                         for i in range(n_layers)])
    index = record.layer_index([f'layer{i}.weight' for i in range(n_layers)])
    values = rng.random((batch * n_layers, len(METRICS)), dtype=np.float32)
    counts, layers = np.zeros((batch * n_layers, 2), np.int64), np.tile(index, batch)
    for start in range(0, n_steps, batch):
        k = min(batch, n_steps - start)
        steps = {'step': np.arange(start, start + k), 'epoch': np.zeros(k, np.int32), 'lr': np.full(k, 1e-3),
                 'loss': rng.random(k, dtype=np.float32), 'skipped': np.zeros(k, bool)}
        record._extend(steps, np.full(k, n_layers), layers[:k * n_layers], values[:k * n_layers], counts[:k * n_layers])
    allocated = sum(a.data.nbytes for a in _record_arrays(record))
    used = sum(a.view.nbytes for a in _record_arrays(record))
    def build(name):
        times = []
        for _ in range(3):
            record._cache.clear()
            start = time.perf_counter(); getattr(record, name); times.append(time.perf_counter() - start)
        return float(np.median(times))
    df_seconds, steps_seconds = build('df'), build('steps')
    assert len(record.df) == n_steps * n_layers
    views = []
    for _ in range(3):   # shown in a notebook right after a fit: its .steps and sampled diagnosis from scratch
        record._cache.clear()
        start = time.perf_counter(); record._repr_html_(); views.append(time.perf_counter() - start)
    return allocated, used, df_seconds, steps_seconds, float(np.median(views))


# --- scaling with the number of layers -----------------------------------------------------------
def per_step_cost(n_layers, steps=50, width=16):
    "Microseconds GradStats() adds per step (its callback events alone) for an MLP of `n_layers` Linear layers."
    torch.manual_seed(0)
    layers, n = [], 64
    for _ in range(n_layers - 1): layers += [nn.Linear(n, width), nn.ReLU()]; n = width
    model = nn.Sequential(*layers, nn.Linear(n, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    cb = GradStats()

    learn = Learner(DataLoaders.from_dsets([(x[0], y[0])], [(x[0], y[0])], bs=1), model, loss_func=CrossEntropyLossFlat())
    learn.create_opt(); learn.loss = torch.tensor(1.0); learn.epoch = 0; learn.training = True
    cb.learn = learn
    cb.before_fit(); cb.before_train()   # a fit sets GradStats up at its first before_train
    learn.loss_grad = nn.functional.cross_entropy(model(x), y)
    learn.loss_grad.backward()
    t, plain = [], []
    for i in range(steps):
        learn.iter = i
        s = time.perf_counter(); cb.before_step(); cb.after_step(); t.append(time.perf_counter() - s)
        # the training step it rides on, for the ratio: forward, backward and the optimizer step
        s = time.perf_counter()
        learn.opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); learn.opt.step()
        plain.append(time.perf_counter() - s)
    cb.after_fit()
    assert len(cb.record) == steps, f'GradStats recorded {len(cb.record)} of {steps} steps: the timing is not of its work'
    t = t[1:]  # the first step builds the plan: a one-time cost; the mean counts the work done every few steps
    early, late = np.mean(t[:len(t) // 2]), np.mean(t[len(t) // 2:])
    ratio = 1 + float(np.mean(t)) / float(np.median(plain))
    return float(np.mean(t)) * 1e6, float(early) * 1e6, float(late) * 1e6, len(list(model.parameters())), ratio


# --- report --------------------------------------------------------------------------------------
def versions():
    out = {'python': platform.python_version(), 'torch': torch.__version__, 'fastai': __import__('fastai').__version__,
           'fastai_gradstats': fastai_gradstats.__version__, 'numpy': np.__version__}
    for mod in ('lightning', 'tensorboard', 'wandb'):
        try: out[mod] = __import__(mod).__version__
        except Exception: pass
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='2 rounds of 20 steps on the MLP only (a smoke test, not a measurement)')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 21: the machine drifts '
                        'from fit to fit, and many short rounds resolve a few percent better than a few long ones)')
    parser.add_argument('--steps', type=int, default=None, help='training steps per fit (default 50)')
    parser.add_argument('--out', default=None, help='write the table here (default benchmarks/RESULTS.md; with --quick, '
                        'only where given: a smoke run must not overwrite the measurements)')
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 21)
    n_batches = args.steps or (20 if args.quick else 50)
    workloads = ['mlp 10x256'] if args.quick else list(WORKLOADS)
    tmp = Path(os.environ.get('TMPDIR', '/tmp'))/'gradstats-bench'
    tmp.mkdir(parents=True, exist_ok=True)
    factories, unavailable = monitors(str(tmp))
    if args.quick: factories = {k: v for k, v in factories.items() if k in ('none', 'floor (foreach_norm, 1 copy)', 'GradStats() defaults', 'naive .item() loop')}
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    results, own, step_ms = {}, {}, {}
    # The heavy peers write large files from background threads and processes (TensorBoard's writer,
    # wandb's service), which would slow whatever fit runs next: they get rounds of their own.
    heavy = [n for n in factories if n.startswith(('TensorBoard', 'wandb'))]
    light = {n: f for n, f in factories.items() if n not in heavy}
    for w in workloads:
        print(f'== {w}', flush=True)
        results[w], own[w], step_ms[w] = bench_workload(w, light, rounds, n_batches)
        if heavy:
            peers, peers_own, _ = bench_workload(w, {'none': factories['none'], **{n: factories[n] for n in heavy}},
                                                 max(3, rounds // 3), n_batches)
            results[w].update({n: peers[n] for n in heavy}); own[w].update({n: peers_own[n] for n in heavy})
        for name, ratio in results[w].items():
            print(f'   {name:38s} {ratio:.3f}x' + (f'  own {own[w][name] * 1e6:7.0f} us/step' if name in own[w] else ''), flush=True)
    memory = {name: kept_memory('mlp 10x256', factories[name], n_batches) for name in factories
              if name not in ('none',) and not name.startswith('wandb') and not name.startswith('TensorBoard')}
    if args.quick: per_step_cost(10, steps=5)  # a smoke run of the scaling code (it checks every step was recorded)
    scaling = [] if args.quick else [per_step_cost(n) for n in (10, 100, 1000)]
    long_steps, long_layers = (10_000, 100) if args.quick else (100_000, 100)
    long_allocated, long_used, df_seconds, steps_seconds, view_seconds = record_at_scale(long_steps, long_layers)
    lines = [f'# GradStats overhead{" (--quick: a smoke test, not a measurement)" if args.quick else ""}', '',
             f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, '
             f'{platform.platform()}.', 'Versions: ' + ', '.join(f'{k} {v}' for k, v in versions().items()) + '.', '',
             f'Median over {rounds} interleaved rounds of time(with monitor) / time(without), {n_batches} training steps '
             'per fit, the same batches and initial weights for every fit; a fit\'s time is its number of steps times '
             'its median step, plus the monitor\'s own time above its median (work done every few steps). '
             '`none (again)` is the noise floor. '
             'TensorBoard and W&B run in rounds of their own (against their own `none`), since their background '
             'writers would slow the fits that follow them.', '']
    header = '| monitor | ' + ' | '.join(workloads) + ' |'
    lines += [header, '|' + ' --- |' * (len(workloads) + 1)]
    for name in list(factories) + ['none (again)']:
        if name == 'none': continue
        lines.append(f'| {name} | ' + ' | '.join(f'{results[w][name]:.3f}x' for w in workloads) + ' |')
    for name, why in unavailable.items(): lines.append(f'| {name} | ' + ' | '.join('unavailable: ' + why for _ in workloads) + ' |')
    lines.append('| (step time without monitor) | ' + ' | '.join(f'{step_ms[w] * 1e3:.2f} ms' for w in workloads) + ' |')
    lines += ['', 'Overhead of `GradStats()` as a multiple of the floor\'s overhead, (ratio - 1) / (floor ratio - 1):', '']
    for w in workloads:
        floor, ours = results[w]['floor (foreach_norm, 1 copy)'] - 1, results[w]['GradStats() defaults'] - 1
        lines.append(f'- {w}: {ours / floor:.2f}x the floor' if floor > 0.002 else f'- {w}: floor overhead within noise ({floor:+.3f})')
    floor_name, ours_name = 'floor (foreach_norm, 1 copy)', 'GradStats() defaults'
    lines += ['', 'Time inside each monitor\'s own code per training step (mean over the steps of a fit but its first, '
              'then median over rounds; its callback events, and for ActivationStats its forward hooks), and as a '
              'multiple of the floor\'s. This resolves far finer than the ratios above, which carry the drift of the whole step; it misses what a '
              'monitor costs the rest of the step (caches it evicts). W&B works in autograd hooks of its own and a '
              'background process, and TensorBoard writes from a background thread: their rows show only their '
              'callback events.', '',
              '| monitor | ' + ' | '.join(workloads) + ' |', '|' + ' --- |' * (len(workloads) + 1)]
    for name in factories:
        if name == 'none': continue
        cells = []
        for w in workloads:
            us, floor_us = own[w][name] * 1e6, own[w][floor_name] * 1e6
            cells.append(f'{us:.0f} us ({us / floor_us:.2f}x floor)' if floor_us > 0 else f'{us:.0f} us')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Memory kept after a fit of the MLP (GradStats: its record\'s arrays; others: traced Python/numpy memory):', '']
    for name, (held, peak) in memory.items(): lines.append(f'- {name}: {held / 1e6:.2f} MB kept (traced peak {peak / 1e6:.2f} MB)')
    lines += ['', 'GradStats\' work buffer while fitting (the gradients copied row-block by row-block; at most 2**22 '
              'elements, freed after the fit): ' + ', '.join(f'{w} {work_buffer_bytes(w) / 1e6:.2f} MB' for w in workloads) + '.']
    lines += ['', f'A record of {long_steps:,} steps x {long_layers} layers with the default statistics (filled 1,000 steps at '
              f'a time through `GradRecord._extend`, GradStats\' path for its waiting steps): {long_used / 1e6:.0f} MB of arrays in use '
              f'({long_used / (long_steps * long_layers):.0f} bytes per (step, layer)), {long_allocated / 1e6:.0f} MB '
              f'allocated ({long_allocated / (long_steps * long_layers):.0f} bytes; the arrays grow by a quarter at a time); building its `.df` '
              f'({long_steps * long_layers:,} rows) took {df_seconds:.2f} s and its `.steps` {steps_seconds:.3f} s '
              '(median of 3 builds; both are cached once built); showing it in a notebook (`_repr_html_`, from an empty '
              f'cache: its `.steps` and the diagnosis of {fastai_gradstats.SAMPLE_STEPS} sampled steps) {view_seconds * 1e3:.0f} ms.']
    if scaling:
        lines += ['', 'Cost of GradStats() per step (its callback events alone, mean over the steps after the first), by number of Linear layers:', '',
                  '| layers | parameter tensors | us per step | us per tensor | first half of steps | second half | ratio to its training step |',
                  '| --- | --- | --- | --- | --- | --- | --- |']
        for (us, early, late, n_tensors, ratio), n in zip(scaling, (10, 100, 1000)):
            lines.append(f'| {n} | {n_tensors} | {us:.0f} | {us / n_tensors:.1f} | {early:.0f} | {late:.0f} | {ratio:.3f}x |')
        lines += ['', 'The ratio is 1 + (GradStats\' cost per step) / (the median forward + backward + Adam step of that '
                  'MLP of width 16 on a batch of 32), timed in the same loop.']
    out = args.out or (None if args.quick else Path(__file__).parent/'RESULTS.md')
    if out is not None: Path(out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__': sys.exit(main())
