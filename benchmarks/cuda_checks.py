"""Issue 7's checks that need a CUDA device: `python benchmarks/cuda_checks.py [--quick] [--out FILE]`.

1. Synchronizing calls. A ResNet-style CNN trains under fastai's `MixedPrecision` with CUDA's sync
   debug mode 'error' around the whole of GradStats' `before_step`, `after_step` and
   `after_cancel_step`, from the second recorded step on (the first builds the plan and moves its
   indices to the device). Any call that waits for the device stops the fit with an error, except
   inside the one host copy of a step (`_to_host`, counted) and inside `refine` on the rare steps it
   redoes in float64 (NaN/Inf gradients, such as the steps the grad scaler skips).
2. Overhead. The same CNN with `MixedPrecision`, without a monitor and with each GradStats
   configuration, in interleaved rounds. Each fit is timed as the wall time of its training steps,
   with one `torch.cuda.synchronize()` at the end, so the device's queue is not drained per step.
   Issue 7 targets at most 1.02x for the defaults.

Without CUDA it runs check 2 on the CPU in float32 at a small size, so that the script itself can
be tested anywhere. The device machine has no fastai: carry its wheels (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastai.basics import Callback, CrossEntropyLossFlat, DataLoaders, Learner, Adam
from fastai.callback.fp16 import MixedPrecision
from fastai.layers import ConvLayer, ResBlock

import fastai_gradstats
import fastai_gradstats.callback as callback_module
import fastai_gradstats.stats as stats_module
from fastai_gradstats import GradStats
from fastai_gradstats.demo import TensorPairs
from fastai_gradstats.stats import LayerStats

CONFIGS = {'GradStats()': {}, 'GradStats(hist=True)': {'hist': True},
           'GradStats(hist=True, update_ratio=True)': {'hist': True, 'update_ratio': True}}
NO_GRAPHS = 'GradStats(), USE_CUDA_GRAPHS = False'  # the defaults, each kernel launched on its own (an A/B of the graphs)


def resnet_learner(device, size, width, n_batches, bs):
    "A ResNet-style CNN (a stem and four ResBlocks) on synthetic images whose label depends on them."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * bs + bs, 3, size, size, generator=g)
    y = (x[:, 0, :4, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 1, :4, :4].mean((1, 2)) > 0).long()
    dls = DataLoaders.from_dsets(TensorPairs(x[:-bs], y[:-bs]), TensorPairs(x[-bs:], y[-bs:]), bs=bs, device=device)
    model = nn.Sequential(ConvLayer(3, width, stride=2), ResBlock(1, width, width), ResBlock(1, width, 2 * width, stride=2),
                          ResBlock(1, 2 * width, 2 * width), ResBlock(1, 2 * width, 4 * width, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 4))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-3)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == 'ProgressCallback'])
    return learn, {k: v.clone() for k, v in learn.model.state_dict().items()}


class FitClock(Callback):
    "Wall time of the training phase, from its first batch until the device has done its last step (validation excluded)."
    order = 10_000
    def __init__(self, device): self.device, self.start, self.end = device, None, None
    def before_batch(self):
        if self.training and self.start is None: self.start = time.perf_counter()
    def after_train(self):
        if self.device.type == 'cuda': torch.cuda.synchronize()  # the only drain of the device's queue
        self.end = time.perf_counter()


def fit(learn, state, cbs, amp, device):
    learn.model.load_state_dict(state)
    learn.opt = None
    clock = FitClock(device)
    torch.manual_seed(0)
    with learn.no_logging(), contextlib.redirect_stdout(io.StringIO()):
        learn.fit(1, cbs=[clock] + ([MixedPrecision()] if amp else []) + cbs)
    return clock.end - clock.start


def check_syncs(learn, state, device, kwargs):
    """One fit under MixedPrecision with CUDA's sync debug mode 'error' around GradStats' before_step, after_step and
    after_cancel_step from its second recorded step on (the first builds the plan and moves its indices to the device):
    any call that waits for the device raises, except inside the host copy (`_to_host`) and inside `refine` on the steps
    it redoes in float64. Returns ({host copies: number of recorded steps that made that many}, steps refined, steps,
    copies after the fit, steps whose reductions a CUDA graph did)."""
    stats, copies, refined, strict, graphed = GradStats(**kwargs), [], [], [False], []
    to_host, refine, run_graph = callback_module.steps._to_host, LayerStats.refine, stats_module._StepGraph.run
    events = {name: getattr(GradStats, name) for name in ('before_step', 'after_step', 'after_cancel_step')}

    def relaxed(fn):
        def run(*args):
            torch.cuda.set_sync_debug_mode(0)
            try: return fn(*args)
            finally: torch.cuda.set_sync_debug_mode('error' if strict[0] else 0)
        return run

    def counted_copy(tensor):
        copies.append(len(stats.record))
        return relaxed(to_host)(tensor)

    def counted_refine(self, values, *args):
        out = relaxed(refine)(self, values, *args)
        refined.append(not np.shares_memory(out[0], values))   # refine copies `values` only to fix rows in float64
        return out

    def counted_graph(self, *args):
        graphed.append(run_graph(self, *args))
        return graphed[-1]

    def checked(original):
        def event(self):
            strict[0] = len(self.record) > 0
            torch.cuda.set_sync_debug_mode('error' if strict[0] else 0)
            try: original(self)
            finally: torch.cuda.set_sync_debug_mode(0); strict[0] = False
        return event
    callback_module.steps._to_host, LayerStats.refine, stats_module._StepGraph.run = counted_copy, counted_refine, counted_graph
    for name, original in events.items(): setattr(GradStats, name, checked(original))
    try: fit(learn, state, [stats], amp=True, device=device)
    finally:
        callback_module.steps._to_host, LayerStats.refine, stats_module._StepGraph.run = to_host, refine, run_graph
        for name, original in events.items(): setattr(GradStats, name, original)
    n = len(stats.record)
    per_step = [copies.count(i) for i in range(n)]
    return dict(sorted({k: per_step.count(k) for k in set(per_step)}.items())), sum(refined), n, copies.count(n), sum(graphed)


def overhead(learn, state, device, amp, rounds):
    "Median over interleaved rounds of time(with) / time(without) for each configuration, and the median fit time."
    names = ['none'] + list(CONFIGS) + [NO_GRAPHS] * (device.type == 'cuda') + ['none (again)']
    make = lambda name: [GradStats(**CONFIGS.get(name, {}))] if name.startswith('GradStats') else []

    def timed(name):
        stats_module.USE_CUDA_GRAPHS = name != NO_GRAPHS   # read when GradStats plans its first step
        try: return fit(learn, state, make(name), amp, device)
        finally: stats_module.USE_CUDA_GRAPHS = True
    for name in names: timed(name)  # warm-up: allocations, cuDNN's choices
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]: times[name].append(timed(name))
    base = times['none']
    return {name: statistics.median(t / b for t, b in zip(times[name], base)) for name in names[1:]}, statistics.median(base)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='2 rounds of a few steps: a smoke test, not a measurement')
    parser.add_argument('--out', type=Path, default=None, help='also write the report to this file')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds of the overhead part (default 9 on CUDA)')
    parser.add_argument('--skip-syncs', action='store_true', help='only the overhead part')
    parser.add_argument('--size', type=int, default=None, help='image size (default 64 on CUDA): larger gives the GPU more work per step')
    parser.add_argument('--width', type=int, default=None, help="the stem's channels (default 64 on CUDA)")
    parser.add_argument('--steps', type=int, default=None, help='steps per fit (default 50 on CUDA)')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore', message='.*[Ss]ynchronization debug mode.*')
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    size, width, bs = (64, 64, 128) if cuda and not args.quick else (16, 8, 16)
    n_batches, rounds = (4, 2) if args.quick else (50, 9) if cuda else (20, 5)
    for option in ('rounds', 'size', 'width', 'steps'):
        value = getattr(args, option)
        if value is not None and value < 1: raise ValueError(f'--{option} must be at least 1, got {value}')
    rounds, size, width = args.rounds or rounds, args.size or size, args.width or width
    n_batches = args.steps or n_batches
    learn, state = resnet_learner(device, size, width, n_batches, bs)
    lines = ['# GradStats on a CUDA device' if cuda else '# GradStats checks (no CUDA device: CPU, float32, small size)', '',
             f'Device: {torch.cuda.get_device_name() if cuda else "cpu"}. Versions: torch {torch.__version__}, '
             f'fastai_gradstats {fastai_gradstats.__version__}. ResNet-style CNN, {size}x{size} images, width {width}, '
             f'batch {bs}, {n_batches} steps per fit, {"MixedPrecision" if cuda else "float32"}.', '']
    if cuda and not args.skip_syncs:
        lines += ['## Synchronizing calls (sync debug mode)', '',
                  "CUDA's sync debug mode was 'error' around GradStats' before_step, after_step and after_cancel_step from "
                  'the second recorded step on, except inside the host copy and inside `refine` on the steps it redoes in '
                  'float64 (a synchronizing call anywhere else would have stopped the fit). Host copies per recorded step, '
                  'as {copies: steps}:', '']
        for name, kwargs in CONFIGS.items():
            per_step, refined, n, after, graphed = check_syncs(learn, state, device, kwargs)
            lines.append(f'- {name}: {per_step} over {n} recorded steps; steps refined in float64 (one more copy '
                         f'inside `refine`): {refined}; copies after the fit: {after}; steps reduced by a CUDA graph: {graphed}')
        lines.append('')
    ratios, base = overhead(learn, state, device, amp=cuda, rounds=rounds)
    lines += [f'## Overhead, median of {rounds} interleaved rounds (time with / time without)', '',
              '| monitor | ratio |', '| --- | --- |'] + [f'| {name} | {r:.3f}x |' for name, r in ratios.items()]
    lines += ['', f'Fit without a monitor: {base * 1e3:.1f} ms for {n_batches} steps.']
    report = '\n'.join(lines) + '\n'
    print(report)
    if args.out: args.out.write_text(report)


if __name__ == '__main__':
    sys.exit(main())
