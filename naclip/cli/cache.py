"""``naclip cache info|clear [--dir DIR]``: show or delete the on-disk text-feature cache
(:mod:`naclip.text_cache`; ``$NACLIP_CACHE_DIR``, default ``~/.cache/naclip``, the empty string = off).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from naclip.cli._args import EXIT_OK, UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cache`` on an argparse sub-parsers object (``func`` = :func:`run`)."""
    from naclip.text_cache import CACHE_ENV

    p = subparsers.add_parser(
        "cache",
        help="show or clear the on-disk text-feature cache",
        description=f"The text-feature cache lives in ${CACHE_ENV} (default ~/.cache/naclip; set it to the "
        "empty string to turn the cache off).",
    )
    p.add_argument("action", choices=("info", "clear"), help="info: location, entries, sizes; clear: delete")
    p.add_argument("--dir", metavar="DIR", help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/naclip)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """``naclip cache`` on parsed ``args``: print the report (``UserError`` when the folder cannot be
    read)."""
    from naclip.text_cache import CACHE_ENV, DiskTextCache, cache_root

    root = Path(args.dir) if args.dir else cache_root()
    if root is None:
        print(f"naclip cache: off (${CACHE_ENV} is set to the empty string)")
        return EXIT_OK
    cache = DiskTextCache(root)
    try:
        lines = cache.clear_report() if args.action == "clear" else cache.info_report()
    except OSError as exc:
        raise UserError(f"cache {str(cache.text_dir)!r}: {exc}") from None
    print("\n".join(lines))
    return EXIT_OK
