"""Derive COCO-Object label maps (``<id>_instanceTrainIds.png``) from COCO-Stuff 164k annotations.

COCO-Object has 81 classes: 0 = background, 1..80 = the 80 COCO thing classes. As in NACLIP's
``datasets/cvt_coco_object.py`` (itself from GroupViT), every thing pixel keeps its class, every stuff pixel
**and every unlabeled pixel** becomes background 0 (``naclip-spec.md`` §3, §7.10: nothing is ignored).

Two source formats are accepted, per image, in this order:

* ``<id>_labelTrainIds.png`` (mmseg's ``coco_stuff164k.py`` output, the COCO-Stuff-171 labels): train ids
  ``0..79`` are the things (in COCO category order), ``80..170`` the 91 stuff classes, 255 unlabeled. Mapping:
  ``t -> t + 1`` for ``t <= 79``; ``80..170 -> 0``; ``255 -> 0``.
* ``<id>.png`` (the raw ``stuffthingmaps_trainval2017`` maps): value = COCO category id - 1, i.e. things are
  the 80 values of ``0..89`` that are not ``{11, 25, 28, 29, 44, 65, 67, 68, 70, 82}`` (unused COCO ids),
  stuff is ``91..181``, 255 unlabeled. Mapping: the k-th thing value (ascending) -> ``k + 1``; stuff and
  255 -> 0.

Both give identical maps for the same image (mmseg's train ids enumerate the same sorted thing values). Any
other value is an error naming the file and the values (never silently kept). Outputs are written atomically
next to the inputs (inputs are never modified); existing outputs are skipped unless ``overwrite``.

Command line: ``python -m naclip.eval.convert_coco_object --root PATH/coco_stuff164k [--split val]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from naclip.eval.datasets import DATASETS, load_label_png
from naclip.io import atomic_write

__all__ = [
    "RAW_THING_VALUES",
    "from_label_train_ids",
    "from_raw_stuffthingmap",
    "convert_coco_object",
    "main",
]

_UNUSED_THING_VALUES = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82)
#: The 80 raw COCO-Stuff map values (category id - 1) of the thing classes, ascending.
RAW_THING_VALUES: tuple[int, ...] = tuple(v for v in range(90) if v not in _UNUSED_THING_VALUES)


def _lut_train_ids() -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int16)
    lut[:80] = np.arange(1, 81)
    lut[80:171] = 0
    lut[255] = 0
    return lut


def _lut_raw() -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int16)
    lut[list(RAW_THING_VALUES)] = np.arange(1, 81)
    lut[91:182] = 0
    lut[255] = 0
    return lut


def _apply(lut: np.ndarray, label: np.ndarray, what: str) -> np.ndarray:
    out = lut[np.asarray(label, dtype=np.uint8)]
    if (out < 0).any():
        vals, counts = np.unique(label[out < 0], return_counts=True)
        listed = ", ".join(f"{int(v)} ({int(c)} px)" for v, c in zip(vals[:10], counts[:10], strict=False))
        raise ValueError(f"{what} holds values that are neither COCO-Stuff classes nor 255: {listed}")
    return out.astype(np.uint8)


def from_label_train_ids(label: np.ndarray, *, what: str = "label") -> np.ndarray:
    """COCO-Stuff-171 train ids (uint8 ``[H, W]``) -> COCO-Object ids (see module docstring)."""
    return _apply(_lut_train_ids(), label, what)


def from_raw_stuffthingmap(label: np.ndarray, *, what: str = "label") -> np.ndarray:
    """Raw ``stuffthingmaps`` values (category id - 1) -> COCO-Object ids (see module docstring)."""
    return _apply(_lut_raw(), label, what)


def convert_coco_object(
    root: str | os.PathLike, *, split: str = "val", overwrite: bool = False
) -> tuple[int, int]:
    """Write ``annotations/<split>2017/<id>_instanceTrainIds.png`` for every ``images/<split>2017/*.jpg``.

    ``root`` is the COCO-Stuff 164k folder (or its parent). Returns ``(written, skipped)``. Raises
    FileNotFoundError naming the folder / the images without a usable source map.
    """
    spec = DATASETS["coco_object"]
    root = Path(root).expanduser()
    sp = spec.split_name(split)
    base = next(
        (
            root / c if c != "." else root
            for c in spec.root_candidates
            if (root / c / f"images/{sp}").is_dir()
        ),
        None,
    )
    if base is None:
        raise FileNotFoundError(f"--root {root}: no images/{sp} folder (expected a COCO-Stuff 164k layout)")
    img_dir, ann_dir = base / "images" / sp, base / "annotations" / sp
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"--root {root}: annotation folder {ann_dir} is missing")
    stems = sorted(p.name[: -len(".jpg")] for p in img_dir.glob("*.jpg"))
    if not stems:
        raise FileNotFoundError(f"no *.jpg images in {img_dir}")
    jobs, missing = [], []
    for s in stems:
        dst = ann_dir / f"{s}_instanceTrainIds.png"
        train_ids, raw = ann_dir / f"{s}_labelTrainIds.png", ann_dir / f"{s}.png"
        if train_ids.is_file():
            jobs.append((dst, train_ids, from_label_train_ids))
        elif raw.is_file():
            jobs.append((dst, raw, from_raw_stuffthingmap))
        else:
            missing.append(s)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(stems)} images in {img_dir} have neither <id>_labelTrainIds.png nor "
            f"the raw <id>.png COCO-Stuff map in {ann_dir}, e.g. {missing[:3]}"
        )
    written = skipped = 0
    for dst, src, fn in jobs:
        if dst.exists() and not overwrite:
            skipped += 1
            continue
        out = fn(load_label_png(src), what=str(src))
        im = Image.fromarray(out)
        atomic_write(dst, lambda f, im=im: im.save(f, format="PNG"), protect=(src,))
        written += 1
    return written, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m naclip.eval.convert_coco_object",
        description="Create COCO-Object <id>_instanceTrainIds.png label maps from COCO-Stuff 164k "
        "annotations (things -> 1..80, stuff and unlabeled -> 0).",
    )
    parser.add_argument("--root", required=True, help="the coco_stuff164k folder (images/, annotations/)")
    parser.add_argument("--split", default="val", help="split to convert (val -> val2017)")
    parser.add_argument(
        "--overwrite", action="store_true", help="rewrite existing _instanceTrainIds.png files"
    )
    args = parser.parse_args(argv)
    try:
        written, skipped = convert_coco_object(args.root, split=args.split, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} COCO-Object label maps, skipped {skipped} existing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
