"""Command line ``naclip segment | demo | eval | score | cache`` (console script ``naclip``, ``python -m
naclip``); the only part of naclip that parses argv.

One module per subcommand (:mod:`~naclip.cli.segment`, :mod:`~naclip.cli.demo`, :mod:`~naclip.cli.eval`,
:mod:`~naclip.cli.score`, :mod:`~naclip.cli.cache`), each with ``add_parser(subparsers)`` and ``run(args)``;
the shared argparse types and options live in :mod:`naclip.cli._args`, the one model loader in
:mod:`naclip.cli._loader`. Exit status: 0 done, 1 some input files failed (``segment``), 2 a user error
(bad arguments, unknown preset, missing weights when offline, ...: one ``error:`` line, no traceback unless
``NACLIP_DEBUG=1``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from naclip.cli._args import (
    BACKENDS,
    DTYPES,
    EXIT_USAGE,
    METHODS,
    MODES,
    UserError,
    add_inference_arguments,
    add_model_arguments,
    byte_size,
    non_negative_int,
    positive_int,
    probability,
)
from naclip.cli.segment import parse_classes_arg
from naclip.collection import IMAGE_SUFFIXES, OutputPaths, collect_inputs, plan_outputs

__all__ = [
    "BACKENDS",
    "DTYPES",
    "IMAGE_SUFFIXES",
    "METHODS",
    "MODES",
    "OutputPaths",
    "SUBCOMMANDS",
    "UserError",
    "add_inference_arguments",
    "add_model_arguments",
    "build_parser",
    "byte_size",
    "collect_inputs",
    "main",
    "non_negative_int",
    "parse_classes_arg",
    "plan_outputs",
    "positive_int",
    "probability",
]

#: The subcommands in ``naclip --help`` order: modules of this package with ``add_parser(subparsers)``
#: (imported by :func:`build_parser`; a failing import is a bug and propagates).
SUBCOMMANDS: tuple[str, ...] = ("segment", "demo", "eval", "score", "cache")


def build_parser() -> argparse.ArgumentParser:
    """The ``naclip`` argument parser with every subcommand of :data:`SUBCOMMANDS`."""
    from naclip import __version__

    parser = argparse.ArgumentParser(
        prog="naclip", description="Training-free open-vocabulary segmentation (NACLIP) on open_clip models."
    )
    parser.add_argument("--version", action="version", version=f"naclip {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"naclip.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
