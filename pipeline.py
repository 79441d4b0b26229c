#!/usr/bin/env python
"""simtorch's command line: wires the ``extract`` and ``measure`` command modules into one parser.

The text users see is ``DESCRIPTION`` and ``EPILOG``.
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


DESCRIPTION = """\
Compare the layers of neural networks: extract each model's activations once, then measure
the similarity of every pair of layers across any number of models.

commands:
  extract   run models over a dataset and write their layer activations to stores
  measure   compare the layers of stores with similarity measures (CKA, Procrustes, CCA...)
  info      describe one store: model, layers, shapes, samples, size on disk
  ls        list the stores in a folder, grouped by the data they were extracted from
"""

EPILOG = """\
demo (trains a small zoo of digit CNNs, extracts it, compares every pair -> data/results/):
  python pipeline.py extract && python pipeline.py measure

`python pipeline.py COMMAND --help` lists a command's options; the full guide is docs/cli.md.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeline.py`` parser: the four commands registered as subparsers."""
    parser = argparse.ArgumentParser(prog="pipeline.py", usage="python pipeline.py COMMAND [options]",
                                     description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(prog="python pipeline.py", metavar="COMMAND", help=argparse.SUPPRESS)
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
