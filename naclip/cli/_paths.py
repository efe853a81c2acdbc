"""The ``--out`` folder of ``naclip segment``: checked without creating anything, created only once a model is
about to run, removed again when nothing was written. Errors are :class:`naclip.cli._args.UserError`. The
input list and the output names are :mod:`naclip.collection`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from naclip.cli._args import UserError


def check_out_dir(out_dir: Path) -> None:
    """``--out`` is, or can become, a writable directory (checked without creating anything)."""
    where = f"--out {str(out_dir)!r}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{where} exists and is not a directory")
    probe = out_dir
    while not probe.exists():
        if probe.is_symlink():
            raise UserError(f"{where}: {str(probe)!r} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{where} cannot be created: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out_dir else f"cannot be created: {str(probe)!r} is read-only"
        raise UserError(f"{where} {what}")


def make_out_dir(out_dir: Path) -> list[Path]:
    """Create ``--out`` (and missing parents) and check a file can be written there; returns the
    directories created, deepest first (removed again by :func:`remove_if_empty` when nothing was
    written). ``UserError`` for a read-only file system, a permission error, ..."""
    created = []
    probe = out_dir
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        remove_if_empty(created)
        raise UserError(
            f"--out {str(out_dir)!r} cannot be created or written: {exc.strerror or exc}"
        ) from None
    return created


def remove_if_empty(dirs: Sequence[Path]) -> None:
    """Remove ``dirs`` in order while they are empty (stops at the first that is not)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return
