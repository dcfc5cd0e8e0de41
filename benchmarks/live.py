"""What does ShowGradStats cost a fit? `python benchmarks/live.py [--quick] [--rounds N] [--threads N] [--out FILE]`

The wall time of a fit with `[GradStats(), ShowGradStats()]` against the same fit with `[GradStats()]` alone, on the
MLP of `overhead.py` (10 x 256 on the digits, the same batches and initial weights every fit), for fits of three
lengths, in interleaved rounds (the order rotates every round, as in `overhead.py`); the result per fit is the median
over rounds of time(with) / time(without), beside the noise floor `[GradStats()] again`. ShowGradStats runs its
notebook path at its default cadence (`every=3`, `max_share=0.02`): this process is no notebook kernel, so a stand-in
for IPython's `display` takes each draw's real PNG and counts it. Writes the table to benchmarks/RESULTS_LIVE.md
(or --out; with --quick only to --out). Each fit's final picture is also timed as the first draw of a fresh process
makes it, with nothing kept from earlier draws.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import fastai_gradstats.live as live
import fastai_gradstats.live_picture as live_picture
from fastai_gradstats import GradStats, ShowGradStats
from overhead import make_learner, versions   # the workload and the machine's description of the overhead benchmark

warnings.filterwarnings('ignore')
WORKLOAD = 'mlp 10x256'
MAKE_BUNDLE = live._bundle   # what a draw makes: the verdict, the picture and its PNG (not timed: `time_drawing` times it)
FITS = {'short': (1, 50), 'medium': (3, 112), 'long': (20, 112)}
"Fit name -> (epochs, training batches per epoch); 112 batches is all of `overhead.digits_repeated`."


class StandInNotebook:
    """What ShowGradStats sees in a notebook kernel: a shell with a kernel and IPython's `display`, here keeping nothing
    but the number of pictures it was handed (each a PNG the callback rendered) and the time spent making them."""
    kernel, execution_count = object(), 1

    def __init__(self): self.draws, self.drawing = 0, 0.0

    def display(self, bundle, raw=False, display_id=None):
        assert raw and bundle['image/png'].startswith(b'\x89PNG'), 'ShowGradStats handed over no PNG'
        self.draws += 1
        return self   # the display handle: `update` is a draw too

    def update(self, bundle, raw=False): self.display(bundle, raw)


def time_drawing(notebook):
    """Add the time ShowGradStats spends making what it displays (`live._bundle`: all of a draw but handing it over:
    the verdict, the picture and its PNG) to `notebook.drawing`."""
    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try: return function(*args, **kwargs)
            finally: notebook.drawing += time.perf_counter() - start
        return wrapper
    live._bundle = timed(live._bundle)


def wall_fit(learn, state, epochs, show):
    "One fit from the same weights and batches: its wall time (validation included), ShowGradStats last when `show`."
    learn.model.load_state_dict(state)
    learn.opt = None
    torch.manual_seed(0)
    cbs = [GradStats()] + ([show] if show is not None else [])
    with learn.no_logging():
        start = time.perf_counter()
        learn.fit(epochs, cbs=cbs)
        return time.perf_counter() - start


def bench_fit(name, rounds, notebook, show_kwargs):
    """Median over `rounds` of time(with ShowGradStats) / time(without), the noise floor, the median time without, and
    per fit with ShowGradStats the median number of draws and of the time spent drawing."""
    epochs, n_batches = FITS[name]
    learn, state = make_learner(WORKLOAD, n_batches)
    for dl in learn.dls.loaders: dl.num_workers = 0   # tensors in memory: worker processes started each epoch only add noise
    configs = ['GradStats()', 'GradStats() + ShowGradStats()', 'GradStats() again']
    times, draws, drawing = {c: [] for c in configs}, [], []
    for config in configs:   # warm-up (first calls, matplotlib's fonts): one epoch of each
        wall_fit(learn, state, 1, ShowGradStats(**show_kwargs) if 'Show' in config else None)
    for r in range(rounds):
        for config in configs[r % 3:] + configs[:r % 3]:
            notebook.draws, notebook.drawing = 0, 0.0
            show = ShowGradStats(**show_kwargs) if 'Show' in config else None
            times[config].append(wall_fit(learn, state, epochs, show))
            if show is not None:
                assert notebook.draws >= 1, 'ShowGradStats drew nothing: the benchmark would time nothing'
                draws.append(notebook.draws); drawing.append(notebook.drawing)
    base = times['GradStats()']
    ratio = lambda config: statistics.median(t / b for t, b in zip(times[config], base))
    return {'steps': epochs * n_batches, 'base': statistics.median(base), 'ratio': ratio(configs[1]),
            'noise': ratio(configs[2]), 'draws': statistics.median(draws), 'drawing': statistics.median(drawing),
            'share': statistics.median(d / t for d, t in zip(drawing, times[configs[1]])),
            'first_draw': first_draw(learn.grad_stats)}


def first_draw(record, repeats=5):
    """Seconds of the final draw of `record` as a process's first draw makes it: nothing kept from earlier draws (the
    rendered text, `live_picture._text_mask`; the record's tables and verdict), median of `repeats`. The fits above
    follow a warm-up fit, so their draws find the names, ticks and labels already rendered."""
    seconds = []
    for _ in range(repeats):
        live_picture._text_mask.cache_clear(); record._cache.clear()
        start = time.perf_counter(); MAKE_BUNDLE(record); seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='1 round of a 20-step fit, at the default cadence and at '
                        'every=0.05 (a smoke test that checks the draws happen, not a measurement)')
    parser.add_argument('--rounds', type=int, default=None, help='interleaved rounds (default 5)')
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's, at most one per core)")
    parser.add_argument('--out', default=None, help='write the table here (default benchmarks/RESULTS_LIVE.md; with '
                        '--quick, only where given)')
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    if args.quick: FITS.clear(); FITS['quick'] = (1, 20)
    torch.set_num_threads(args.threads or min(torch.get_num_threads(), os.cpu_count() or 1))
    notebook = StandInNotebook()
    live._notebook = lambda: (notebook, notebook.display)   # the notebook path, as in a kernel
    time_drawing(notebook)
    cadences = {'defaults (every=3, max_share=0.02)': {}}
    if args.quick: cadences['every=0.05, max_share=1'] = {'every': 0.05, 'max_share': 1}
    results = {}
    for cadence, kwargs in cadences.items():
        for name in FITS:
            print(f'== {name} fit, ShowGradStats {cadence}', flush=True)
            results[name, cadence] = row = bench_fit(name, rounds, notebook, kwargs)
            print(f"   {row['ratio']:.3f}x (noise {row['noise']:.3f}x), {row['draws']:g} draws, "
                  f"{row['drawing']:.2f} s drawing of {row['base']:.1f} s", flush=True)
    if args.quick:
        assert results['quick', 'every=0.05, max_share=1']['draws'] >= 2, 'no draw while the fit ran'
    lines = [f'# ShowGradStats overhead{" (--quick: a smoke test, not a measurement)" if args.quick else ""}', '',
             f'Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, '
             f'{platform.platform()}.', 'Versions: ' + ', '.join(f'{k} {v}' for k, v in versions().items()) + '.', '',
             f'Median over {rounds} interleaved rounds of the wall time of a fit (validation included) with '
             '`[GradStats(), ShowGradStats()]` / with `[GradStats()]`, on the MLP of `overhead.py` (10 x 256, digits, '
             'Adam), the same batches and initial weights every fit. ShowGradStats draws on its notebook path (each '
             'draw renders the PNG; a stand-in display takes it). `GradStats() again` is the noise floor. Drawing: the '
             'time spent making what is displayed per fit (`live._bundle`: the verdict, the picture and its PNG), and '
             'its share of the fit (medians).', '',
             '| fit | steps | ShowGradStats | time without | ratio | noise floor | draws | drawing | share | a first draw | its share |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for (name, cadence), row in results.items():
        epochs, n_batches = FITS[name]
        lines.append(f"| {name} ({epochs} x {n_batches} steps) | {row['steps']} | {cadence} | {row['base']:.2f} s | "
                     f"{row['ratio']:.3f}x | {row['noise']:.3f}x | {row['draws']:g} | {row['drawing']:.3f} s | "
                     f"{100 * row['share']:.1f}% | {row['first_draw']:.3f} s | "
                     f"{100 * row['first_draw'] / (row['base'] + row['first_draw']):.1f}% |")
    lines += ['', 'The target: drawing takes at most 3% of a digits MLP fit at the default cadence (`share`; the '
              'wall-time ratio beside its noise floor cannot resolve a few percent on these cores). Every fit ends with one '
              'draw; a fit shorter than about 2 draws / `max_share` gets that one only, so its share is one draw over the '
              'fit. The fits above follow '
              'a warm-up fit, so their draws reuse the layer names, ticks and labels rendered before. `a first draw`: the '
              'same final picture drawn with nothing kept, as the first draw in a fresh process makes it; `its share`: of '
              'the fit without ShowGradStats plus that draw.']
    out = args.out or (None if args.quick else Path(__file__).parent/'RESULTS_LIVE.md')
    if out is not None: Path(out).write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__': sys.exit(main())
