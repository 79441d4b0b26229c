#!/usr/bin/env python
"""simtorch command line: ``extract`` activations to stores, ``measure`` similarities between them.

    python pipeline.py extract            # the embedded demo zoo -> data/activations/
    python pipeline.py measure            # every demo store against every other -> data/results/

Each subcommand has ``<name>_command_parser(subparsers=None)`` and
``<name>_command(args)``; command bodies only call library entry points.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from extract.cli import (
    CommandError,
    extract_command,
    extract_command_parser,
    info_command,
    info_command_parser,
    ls_command,
    ls_command_parser,
)
from measure.cli import measure_command, measure_command_parser

__all__ = [
    "CommandError",
    "build_parser",
    "extract_command",
    "extract_command_parser",
    "info_command",
    "info_command_parser",
    "ls_command",
    "ls_command_parser",
    "main",
    "measure_command",
    "measure_command_parser",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simtorch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(title="commands")
    extract_command_parser(subparsers)
    measure_command_parser(subparsers)
    info_command_parser(subparsers)
    ls_command_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("default")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
