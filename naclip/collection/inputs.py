"""The input list and the output plan of a collection run: which files a list of files, folders and glob
patterns names, and where each one's outputs go.

Contract: :func:`collect_inputs` keeps each argument's order; a folder gives its image files
(:data:`IMAGE_SUFFIXES`) sorted by relative path, subfolders too with ``recursive``; a pattern with
``* ? [`` is expanded here (``**`` spans folders only with ``recursive``); duplicates keep their first place.
:func:`plan_outputs` mirrors the input tree below ``out_dir`` and refuses any output that is an input
(:class:`CollectionError`); :func:`expected_outputs` lists what one input produces. Reads the file system,
writes nothing.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Pillow formats that register a suffix but cannot decode pixels without external tools / handlers.
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "EPS", "MPEG", "WMF"}
_OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png", "_probs.npy", "_heatmaps.png")
_MAGIC = ("*", "?", "[")


def _pil_suffixes() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    ok = {fmt for fmt in Image.OPEN if fmt not in _UNDECODABLE}
    return tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in ok))


#: File suffixes picked up in folders and by patterns: every suffix Pillow can open (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = _pil_suffixes()


class CollectionError(ValueError):
    """A bad input list or output plan (missing path, empty match, an output that is an input)."""


def _video_suffixes() -> tuple[str, ...]:
    from naclip.video import VIDEO_SUFFIXES

    return VIDEO_SUFFIXES


def is_video(path: Path) -> bool:
    """Whether ``path`` names a video (a suffix of :data:`naclip.video.VIDEO_SUFFIXES`, any case)."""
    return path.suffix.lower() in _video_suffixes()


# --------------------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Input:
    """One input: ``path`` as found, ``rel`` its output location below ``--out`` (folders + stem, no
    suffix)."""

    path: Path
    rel: Path


def _under(path: Path, root: Path | None) -> bool:
    return root is not None and (path == root or root in path.parents)


def _scan(root: Path, *, recursive: bool, out_dir: Path | None) -> list[Path]:
    """Image files of ``root`` (and its subfolders with ``recursive``), sorted by their relative path parts;
    files under ``out_dir`` named like outputs are left out (a rerun into the input tree)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if not recursive:
            dirnames.clear()
        here = Path(dirpath)
        in_out = _under(here.resolve(), out_dir)
        for name in filenames:
            f = here / name
            skip = in_out and name.endswith(_OUTPUT_SUFFIXES)
            if f.suffix.lower() in IMAGE_SUFFIXES and not skip and f.is_file():
                found.append(f)
    return sorted(found, key=lambda f: f.relative_to(root).parts)


def _pattern_root(pattern: str) -> Path:
    """The leading folders of ``pattern`` without wildcards (what the outputs are mirrored relative to)."""
    parts = Path(pattern).parts
    keep = []
    for part in parts[:-1]:
        if any(m in part for m in _MAGIC):
            break
        keep.append(part)
    return Path(*keep) if keep else Path(".")


def _expand(item: str, *, recursive: bool, out_dir: Path | None) -> list[Input]:
    p = Path(item)
    if p.is_dir():
        files = _scan(p, recursive=recursive, out_dir=out_dir)
        if not files:
            sub = " or its subfolders" if recursive else " (add --recursive for subfolders)"
            raise CollectionError(f"directory {item!r}{sub} contains no image files Pillow can open")
        return [Input(f, f.relative_to(p).with_name(f.stem)) for f in files]
    if p.exists():
        return [Input(p, Path(p.stem))]
    if not any(m in item for m in _MAGIC):
        raise CollectionError(f"input {item!r} does not exist")
    if "**" in item and not recursive:
        raise CollectionError(f"pattern {item!r}: ** spans folders only with --recursive (add it, or use *)")
    root = _pattern_root(item)
    suffixes = (*IMAGE_SUFFIXES, *_video_suffixes())
    out: list[Input] = []
    for match in sorted(glob.glob(item, recursive=recursive)):
        m = Path(match)
        if m.is_dir():
            out += [
                Input(f, f.relative_to(root).with_name(f.stem))
                for f in _scan(m, recursive=False, out_dir=out_dir)
            ]
        elif m.suffix.lower() in suffixes and not (
            _under(m.resolve(), out_dir) and m.name.endswith(_OUTPUT_SUFFIXES)
        ):
            out.append(Input(m, m.relative_to(root).with_name(m.stem)))
    if not out:
        raise CollectionError(f"pattern {item!r} matches no image or video file")
    return out


def collect_inputs(
    items: Sequence[str], *, recursive: bool = False, out_dir: Path | None = None
) -> list[Input]:
    """Expand files, folders and glob patterns into the ordered, de-duplicated :class:`Input` list (see the
    module docstring). ``CollectionError`` for a missing path or a folder / pattern without images.
    Explicit files are kept whatever their suffix (an unreadable one fails when it is processed)."""
    skip = out_dir.resolve() if out_dir is not None else None
    out: list[Input] = []
    seen: set[Path] = set()
    for item in items:
        for inp in _expand(str(item), recursive=recursive, out_dir=skip):
            key = inp.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(inp)
    return out


# -------------------------------------------------------------------------------------------- the outputs


@dataclass(frozen=True)
class OutputPaths:
    """The files of one image input (``None``: not requested). A video input uses ``mask``'s folder and
    base name for ``<base>_overlay.mp4``, ``<base>_frames.json`` and ``<base>_masks/``."""

    mask: Path
    overlay: Path | None
    probs: Path | None
    json: Path | None = None
    heatmaps: Path | None = None

    @property
    def base(self) -> Path:
        return self.mask.with_name(self.mask.name.removesuffix("_mask.png"))


def _output_names(inputs: Sequence[Input]) -> list[Path]:
    """``rel`` of each input, made unique per output folder: a stem shared by several inputs of one folder
    becomes ``<stem>_<ext>``, a name still taken gets ``_<n>`` (n = 2, 3, ..., in input order)."""
    counts: dict[Path, int] = {}
    for inp in inputs:
        counts[inp.rel] = counts.get(inp.rel, 0) + 1
    used: set[Path] = set()
    names = []
    for inp in inputs:
        base = inp.rel
        if counts[base] > 1:
            base = base.with_name(f"{base.name}_{inp.path.suffix.lstrip('.').lower() or 'noext'}")
        name, n = base, 1
        while name in used:
            n += 1
            name = base.with_name(f"{base.name}_{n}")
        used.add(name)
        names.append(name)
    return names


def plan_outputs(
    inputs: Sequence[Input], out_dir: Path, *, overlay: bool, probs: bool, json: bool = False,
    heatmaps: bool = False,
) -> list[OutputPaths]:  # fmt: skip
    """The output paths of each input (see :func:`_output_names` for the naming rule); ``CollectionError``
    when an output path is one of the inputs (inputs are never overwritten)."""
    plans = []
    for name in _output_names(inputs):
        base = out_dir / name
        plans.append(
            OutputPaths(
                mask=base.with_name(f"{base.name}_mask.png"),
                overlay=base.with_name(f"{base.name}_overlay.png") if overlay else None,
                probs=base.with_name(f"{base.name}_probs.npy") if probs else None,
                json=base.with_name(f"{base.name}.json") if json else None,
                heatmaps=base.with_name(f"{base.name}_heatmaps.png") if heatmaps else None,
            )
        )
    input_keys = {inp.path.resolve() for inp in inputs}
    for plan in plans:
        for target in (plan.mask, plan.overlay, plan.probs, plan.json, plan.heatmaps):
            if target is not None and target.resolve() in input_keys:
                raise CollectionError(
                    f"output {str(target)!r} would overwrite an input; choose another --out directory"
                )
    return plans


def expected_outputs(path: Path, plan: OutputPaths, *, frame_masks: bool = False) -> list[Path]:
    """Every file (and, for a video's frame masks, folder) the input ``path`` produces: an image's requested
    kinds; a video's overlay, masks folder and per-frame JSON (written last)."""
    if is_video(path):
        base = plan.base
        extra = [base.with_name(f"{base.name}_masks")] if frame_masks else []
        return [
            base.with_name(f"{base.name}_overlay.mp4"),
            *extra,
            base.with_name(f"{base.name}_frames.json"),
        ]
    return [p for p in (plan.probs, plan.mask, plan.overlay, plan.json, plan.heatmaps) if p is not None]


def _complete(paths: Sequence[Path]) -> bool:
    """All outputs exist: non-empty regular files (or a folder for frame masks). Every writer goes through
    :func:`naclip.io.atomic_write`, so a file under its final name is whole."""
    for p in paths:
        if not (p.is_dir() if p.name.endswith("_masks") else p.is_file() and p.stat().st_size > 0):
            return False
    return True
