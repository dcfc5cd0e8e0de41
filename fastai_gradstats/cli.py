"""The `gradstats` command (also `python -m fastai_gradstats`).

- `gradstats demo [--out DIR] [--quick]`: train the forum experiments, save runs, figures and a report;
- `gradstats report RUN... [--out FILE]`: one self-contained HTML report from saved runs;
- `gradstats summary RUN [--all]`: the health summary of a saved run in the terminal
  (`--all`: also list the checks that found nothing).

A missing or unreadable run gives a one-line error and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ['main']


def _parser():
    parser = argparse.ArgumentParser(prog='gradstats', description='Gradient statistics of fastai training runs.')
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='train the forum experiments on the digits data and write a report')
    demo.add_argument('--out', default='gradstats-demo', help='directory for runs, figures and report.html (default: %(default)s)')
    demo.add_argument('--quick', action='store_true', help='fewer epochs: under 30 s, for tests and a first look')
    report = sub.add_parser('report', help='one self-contained HTML report from saved runs')
    report.add_argument('runs', nargs='+', help='directories written by GradRecord.save (or the demo)')
    report.add_argument('--out', default='report.html', help='the HTML file to write (default: %(default)s)')
    summary = sub.add_parser('summary', help='print the health summary of a saved run')
    summary.add_argument('run', help='a directory written by GradRecord.save (or the demo)')
    summary.add_argument('--all', action='store_true', help='also list the checks that found nothing')
    return parser


def _load(path):
    from .record import load
    return load(path)


def _names(paths):
    """Run names for the report: directory names, made unique. A name met again gets ' (2)', ' (3)', ...: the
    first that is neither another run's directory name nor a name given already."""
    bases = [Path(p).resolve().name or str(p) for p in paths]
    names, seen, taken = [], set(), set(bases)
    for base in bases:
        name = base
        if base in seen:
            k = 2
            while f'{base} ({k})' in taken: k += 1
            name = f'{base} ({k})'
            taken.add(name)
        seen.add(base)
        names.append(name)
    return names


def main(argv=None) -> int:
    "Entry point of the `gradstats` command; returns the exit code (0 ok, 2 bad input)."
    args = _parser().parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    try:
        if args.command == 'demo':
            from .demo import run_demo
            run_demo(args.out, quick=args.quick)
        elif args.command == 'report':
            from .questions import answer
            from .report import write_report
            records = {name: _load(p) for name, p in zip(_names(args.runs), args.runs)}
            print(f"wrote {write_report(records, args.out, questions=answer(records))}")
        elif args.command == 'summary':
            from .health import summary
            print(summary(_load(args.run), show_ok=args.all))
    except (FileNotFoundError, ValueError, TypeError, OSError) as e:
        print(f"gradstats {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__': sys.exit(main())
