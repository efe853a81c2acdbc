"""The collection options of ``naclip segment`` on an ``argparse`` parser.

Contract: :func:`add_collection_args` adds ``--recursive``, ``--skip-existing``, ``--manifest/--no-manifest``,
``--fail-fast`` and ``--prefetch N``; their defaults are those of :mod:`naclip.collection.manifest` and
:mod:`naclip.collection.prefetch`; what they do is :func:`naclip.collection.run_collection`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from naclip.collection.manifest import MANIFEST_NAME
from naclip.collection.prefetch import DEFAULT_PREFETCH


def add_collection_args(p: argparse.ArgumentParser, *, count_type: Callable[[str], int] = int) -> None:
    """The collection options of ``naclip segment``: ``--recursive``, ``--skip-existing``,
    ``--manifest/--no-manifest``, ``--fail-fast``, ``--prefetch N`` (``count_type``: the CLI's
    non-negative int parser)."""
    p.add_argument(
        "--recursive",
        action="store_true",
        help="also take images from subfolders of a folder input, and let ** in a quoted pattern span "
        "folders. Outputs mirror the input tree: <out>/<path below the folder or pattern root>/"
        "<stem>_mask.png; explicit files go to <out>; names meeting in one output folder get "
        "<stem>_<ext>[_<n>]",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip an input whose requested outputs all exist (written atomically, so they are whole) unless "
        f"<out>/{MANIFEST_NAME} records them with other settings; rerun an interrupted run with it to resume",
    )
    p.add_argument(
        "--manifest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write <out>/{MANIFEST_NAME}: per input its outputs, status (done / skipped / failed with the "
        "error) and settings fingerprint (default on)",
    )
    p.add_argument(
        "--fail-fast", action="store_true", help="stop at the first input that fails (default: go on, exit 1)"
    )
    p.add_argument(
        "--prefetch",
        type=count_type,
        default=DEFAULT_PREFETCH,
        metavar="N",
        help=f"images decoded ahead of the model in a background thread (default {DEFAULT_PREFETCH}; "
        "0 = decode in turn)",
    )
