"""Two versions of fastai_gradstats side by side: GradStats' cost on the same fits, in one run.

`python benchmarks/versions.py OLD_CHECKOUT NEW_CHECKOUT [--rounds N] [--steps N] [--out FILE]`

Each round runs one worker process per checkout, in an order that alternates from round to round; a worker imports
fastai_gradstats from its checkout (PYTHONPATH) and times, with `overhead.py`'s protocol (this file's copy of it, so
both versions run the same workloads), fits of the 10 x 256 MLP, the ResBlock CNN and the transformer without and with
`GradStats()` (its defaults), interleaved: the ratio with / without and GradStats' own time per step. The table gives
each version's median over rounds and the new one's over the old one's. Run it alone: two torch processes on the same
cores slow each other many times over, so the workers run one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(steps: int):
    "One round in this process: each workload's ratio and GradStats' own time per step, as one JSON line on stdout."
    sys.path.insert(0, str(HERE))
    import overhead
    import fastai_gradstats
    factories, _ = overhead.monitors('/tmp/gradstats-versions')
    chosen = {name: factories[name] for name in ('none', 'GradStats() defaults')}
    out = {'version_file': fastai_gradstats.__file__}
    for workload in overhead.WORKLOADS:
        ratios, own, _ = overhead.bench_workload(workload, chosen, rounds=3, n_batches=steps)
        out[workload] = {'ratio': ratios['GradStats() defaults'], 'own_us': own['GradStats() defaults'] * 1e6}
    print(json.dumps(out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('old', help='a checkout of the version before (its root: the folder holding fastai_gradstats/)')
    parser.add_argument('new', help='a checkout of the version after')
    parser.add_argument('--rounds', type=int, default=7, help='rounds, each one worker per version (default %(default)s)')
    parser.add_argument('--steps', type=int, default=50, help='training steps per fit (default %(default)s)')
    parser.add_argument('--out', default=None, help='also write the table to this file')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker: return worker(args.steps)
    checkouts = {'old': Path(args.old).resolve(), 'new': Path(args.new).resolve()}
    for name, path in checkouts.items():
        if not (path/'fastai_gradstats'/'__init__.py').is_file():
            parser.error(f"`{name}` {str(path)!r} is not a checkout of fastai_gradstats (no fastai_gradstats/__init__.py)")
    runs = {name: [] for name in checkouts}
    for r in range(args.rounds):
        order = list(checkouts) if r % 2 == 0 else list(checkouts)[::-1]
        for name in order:
            env = {**os.environ, 'PYTHONPATH': str(checkouts[name]), 'MPLBACKEND': 'Agg'}
            proc = subprocess.run([sys.executable, __file__, args.old, args.new, '--worker', '--steps', str(args.steps)],
                                  capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode: raise SystemExit(f"the {name} worker failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert Path(result.pop('version_file')).resolve().is_relative_to(checkouts[name]), 'imported the wrong checkout'
            runs[name].append(result)
            print(f"round {r + 1} {name}: " + ', '.join(f"{w} {v['ratio']:.3f}x {v['own_us']:.0f} us" for w, v in result.items()),
                  flush=True)
    workloads = list(runs['old'][0])
    lines = [f'# Two versions side by side ({args.rounds} rounds, {args.steps} steps per fit, workers alternating)', '',
             f'old: {checkouts["old"]}; new: {checkouts["new"]}', '',
             '| workload | ratio old | ratio new | own us/step old | own us/step new | own new / old |',
             '| --- | --- | --- | --- | --- | --- |']
    for w in workloads:
        med = {name: (statistics.median(x[w]['ratio'] for x in runs[name]), statistics.median(x[w]['own_us'] for x in runs[name]))
               for name in runs}
        lines.append(f"| {w} | {med['old'][0]:.3f}x | {med['new'][0]:.3f}x | {med['old'][1]:.0f} | {med['new'][1]:.0f} | "
                     f"{med['new'][1] / med['old'][1]:.3f} |")
    text = '\n'.join(lines)
    print(text)
    if args.out: Path(args.out).write_text(text + '\n')
    return 0


if __name__ == '__main__': sys.exit(main())
