"""Issue 7's checks that need a CUDA device: `python benchmarks/cuda_checks.py [--quick] [--out FILE]`.

1. Synchronizing calls. A ResNet-style CNN trains under fastai's `MixedPrecision` while
   `torch.cuda.set_sync_debug_mode` is on around GradStats' own work only:
   - 'error' around `LayerStats._collect`, the device side of a recorded step (every reduction,
     the parameter norms, the histogram): any synchronizing call there stops the fit with an error;
   - 'warn' around the whole of GradStats' `before_step` and `after_step`, counting the
     synchronizing calls per step. The design says one per recorded step (the single host copy),
     two on the rare steps `refine` redoes in float64 (NaN/Inf gradients, such as the steps the
     grad scaler skips), and none in `after_step`.
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

import torch
from torch import nn

from fastai.basics import Callback, CrossEntropyLossFlat, DataLoaders, Learner, Adam
from fastai.callback.fp16 import MixedPrecision
from fastai.layers import ConvLayer, ResBlock

import fastai_gradstats
from fastai_gradstats import GradStats
from fastai_gradstats.demo import TensorPairs
from fastai_gradstats.stats import LayerStats

CONFIGS = {'GradStats()': {}, 'GradStats(hist=True)': {'hist': True},
           'GradStats(hist=True, update_ratio=True)': {'hist': True, 'update_ratio': True}}


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


@contextlib.contextmanager
def sync_mode(mode):
    "CUDA's sync debug mode set to `mode` inside, the mode before restored after (the modes nest)."
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try: yield
    finally: torch.cuda.set_sync_debug_mode(before)


def count_syncs(learn, state, device, kwargs):
    """Synchronizing calls per recorded step in GradStats' before_step and after_step ('warn' mode), with its
    device-side reductions under 'error' mode. Returns ({calls: number of steps} for each event, steps refined)."""
    counts = {'before_step': [], 'after_step': []}
    originals = {name: getattr(GradStats, name) for name in counts}
    collect, refine, refined = LayerStats._collect, LayerStats.refine, []

    def strict_collect(self, *args):
        with sync_mode('error'): return collect(self, *args)

    def counting_refine(self, values, grads, params):
        out = refine(self, values, grads, params)
        refined.append(bool(out[1].any()))
        return out

    def counted(name):
        def event(self):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                with sync_mode('warn'): originals[name](self)
            counts[name].append(sum('synchroniz' in str(w.message) for w in caught))
        return event
    LayerStats._collect, LayerStats.refine = strict_collect, counting_refine
    for name in counts: setattr(GradStats, name, counted(name))
    try: fit(learn, state, [GradStats(**kwargs)], amp=True, device=device)
    finally:
        LayerStats._collect, LayerStats.refine = collect, refine
        for name, method in originals.items(): setattr(GradStats, name, method)
    return {name: dict(sorted({k: c.count(k) for k in set(c)}.items())) for name, c in counts.items()}, sum(refined)


def overhead(learn, state, device, amp, rounds):
    "Median over interleaved rounds of time(with) / time(without) for each configuration, and the median fit time."
    names = ['none'] + list(CONFIGS) + ['none (again)']
    make = lambda name: [GradStats(**CONFIGS[name])] if name in CONFIGS else []
    for name in names: fit(learn, state, make(name), amp, device)  # warm-up: allocations, cuDNN's choices
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]: times[name].append(fit(learn, state, make(name), amp, device))
    base = times['none']
    return {name: statistics.median(t / b for t, b in zip(times[name], base)) for name in names[1:]}, statistics.median(base)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='2 rounds of a few steps: a smoke test, not a measurement')
    parser.add_argument('--out', type=Path, default=None, help='also write the report to this file')
    args = parser.parse_args(argv)
    warnings.filterwarnings('ignore', message='.*[Ss]ynchronization debug mode.*')
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    size, width, bs = (64, 64, 128) if cuda and not args.quick else (16, 8, 16)
    n_batches, rounds = (4, 2) if args.quick else (50, 9) if cuda else (20, 5)
    learn, state = resnet_learner(device, size, width, n_batches, bs)
    lines = ['# GradStats on a CUDA device' if cuda else '# GradStats checks (no CUDA device: CPU, float32, small size)', '',
             f'Device: {torch.cuda.get_device_name() if cuda else "cpu"}. Versions: torch {torch.__version__}, '
             f'fastai_gradstats {fastai_gradstats.__version__}. ResNet-style CNN, {size}x{size} images, width {width}, '
             f'batch {bs}, {n_batches} steps per fit, {"MixedPrecision" if cuda else "float32"}.', '']
    if cuda:
        lines += ['## Synchronizing calls per recorded step (sync debug mode)', '',
                  "`LayerStats._collect` ran under 'error' mode without raising. Counts under 'warn' mode, as "
                  '{calls: steps}:', '']
        for name, kwargs in CONFIGS.items():
            counts, refined = count_syncs(learn, state, device, kwargs)
            lines.append(f'- {name}: before_step {counts["before_step"]}, after_step {counts["after_step"]}; '
                         f'steps refined in float64 (two copies): {refined}')
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
