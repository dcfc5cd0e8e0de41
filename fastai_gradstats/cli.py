"""The `gradstats` command: `gradstats demo` trains the experiments and saves what was recorded."""
from __future__ import annotations

import argparse
import sys

__all__ = ['main']


def _parser():
    parser = argparse.ArgumentParser(prog='gradstats', description='Gradient statistics for fastai training runs.')
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='train small models on the digits data and record their gradients')
    demo.add_argument('--out', default='gradstats-demo', help='directory for the saved runs (default: %(default)s)')
    demo.add_argument('--quick', action='store_true', help='a short run, for tests and a first look')
    return parser


def main(argv=None) -> int:
    "Entry point of the `gradstats` command; returns the exit code."
    args = _parser().parse_args(argv)
    if args.command == 'demo':
        from .demo import run_demo
        run_demo(args.out, quick=args.quick)
    return 0


if __name__ == '__main__': sys.exit(main())
