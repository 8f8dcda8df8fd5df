"""The command line: `autojac COMMAND` or `python -m autojac COMMAND`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(min_time=args.min_time)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autojac", description="Autotuned per-sample derivatives for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log tuning decisions (INFO)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser("demo", help="tune real examples and show what won, why, and the speed-ups")
    demo.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per contender")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line on stderr, exit 1; tracebacks are for --verbose
        if args.verbose:
            raise
        print(f"autojac: error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
