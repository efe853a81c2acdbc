"""Input files and output paths of ``naclip segment``: expanding files and folders
(:func:`collect_inputs`), naming the outputs of each input (:func:`plan_outputs`, never an input's path) and
the ``--out`` folder (checked without creating anything, created only once a model is about to run, removed
again when nothing was written). Errors are :class:`naclip.cli._args.UserError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from naclip.cli._args import UserError

#: File suffixes picked up when a directory is given as input (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _is_output_name(p: Path) -> bool:
    return p.name.endswith(("_mask.png", "_overlay.png", "_probs.npy", "_heatmaps.png"))


def collect_inputs(items: Sequence[str], *, skip_outputs_in: Path | None = None) -> list[Path]:
    """Expand files and directories (non-recursive, :data:`IMAGE_SUFFIXES`) into an ordered, de-duplicated
    list.

    A missing path raises :class:`UserError`; a directory without images too. Explicit files are kept whatever
    their suffix (an unreadable one is reported when it is processed). When a scanned directory is
    ``skip_outputs_in`` (the output directory), files named like outputs of an earlier run are skipped.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    skip_dir = skip_outputs_in.resolve() if skip_outputs_in is not None else None
    for item in items:
        p = Path(item)
        if p.is_dir():
            is_out = p.resolve() == skip_dir
            found = sorted(
                c
                for c in p.iterdir()
                if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES and not (is_out and _is_output_name(c))
            )
            if not found:
                raise UserError(f"directory {item!r} contains no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif p.exists():
            found = [p]
        else:
            raise UserError(f"input {item!r} does not exist")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


@dataclass(frozen=True)
class OutputPaths:
    """The files written for one input (``None``: not asked for)."""

    mask: Path
    overlay: Path | None
    probs: Path | None
    json: Path | None = None
    heatmaps: Path | None = None


def plan_outputs(
    inputs: Sequence[Path], out_dir: Path, *, overlay: bool, probs: bool, json: bool = False,
    heatmaps: bool = False,
) -> list[OutputPaths]:  # fmt: skip
    """Output paths per input: ``<stem>_mask.png`` etc.; inputs sharing a stem get ``<stem>_<ext>[_n]``.

    Raises :class:`UserError` when an output path is one of the inputs (inputs are never overwritten).
    """
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    used: set[str] = set()
    plans = []
    for p in inputs:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower() or 'noext'}"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        plans.append(
            OutputPaths(
                mask=out_dir / f"{name}_mask.png",
                overlay=out_dir / f"{name}_overlay.png" if overlay else None,
                probs=out_dir / f"{name}_probs.npy" if probs else None,
                json=out_dir / f"{name}.json" if json else None,
                heatmaps=out_dir / f"{name}_heatmaps.png" if heatmaps else None,
            )
        )
    input_keys = {p.resolve() for p in inputs}
    for plan in plans:
        for target in (plan.mask, plan.overlay, plan.probs, plan.json, plan.heatmaps):
            if target is not None and target.resolve() in input_keys:
                raise UserError(
                    f"output {str(target)!r} would overwrite an input; choose another --out directory"
                )
    return plans


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
