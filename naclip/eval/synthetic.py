"""Tiny synthetic datasets in the 8 on-disk layouts (for tests, benchmarks and checking an installation).

:func:`make_synthetic_dataset` writes random RGB images and label maps with known contents in exactly the
layout :class:`naclip.eval.datasets.EvalDataset` reads (split files included), using the *stored* label
conventions of each benchmark (e.g. VOC20 files hold 0 = background, which the reader maps to 255). Labels are
random blocks of class ids plus a few ignore (255) pixels. The returned dict maps sample id -> stored label
array, so tests can derive the expected ground truth independently of the reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from naclip._validate import check_positive_int
from naclip.eval.datasets import DATASETS, canonical_dataset_name
from naclip.io import atomic_write, voc_palette

__all__ = ["STORED_VALUE_RANGE", "build_parser", "main", "make_synthetic_dataset"]

#: Valid stored label values (inclusive) per dataset, before the reader's conversion (255 = ignore aside).
STORED_VALUE_RANGE = {
    "voc21": (0, 20),
    "voc20": (0, 20),
    "context60": (0, 59),
    "context59": (0, 59),
    "coco_object": (0, 80),
    "coco_stuff": (0, 170),
    "cityscapes": (0, 18),
    "ade20k": (0, 150),
}


def _blocks(rng: np.random.Generator, h: int, w: int, lo: int, hi: int, ignore_frac: float) -> np.ndarray:
    """Random rectangles of class ids in lo..hi on a random background, plus ~ignore_frac pixels of 255."""
    lab = np.full((h, w), rng.integers(lo, hi + 1), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
        lab[y0:y1, x0:x1] = rng.integers(lo, hi + 1)
    if ignore_frac > 0:
        lab[rng.random((h, w)) < ignore_frac] = 255
    return lab


def _save_png(arr: np.ndarray, path: Path, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    if palette:
        im.putpalette(voc_palette().tobytes())  # 'L' -> 'P', indices unchanged
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def _save_image(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    atomic_write(path, lambda f: im.save(f, format=fmt, quality=95))


def make_synthetic_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    num_images: int = 4,
    sizes: list[tuple[int, int]] | None = None,
    seed: int = 0,
    ignore_frac: float = 0.02,
    wrap: bool = False,
) -> dict[str, np.ndarray]:
    """Write a synthetic ``name`` dataset (val split) under ``root``; return ``{sample id: stored label}``.

    Args:
        name: dataset key or alias (see :data:`naclip.eval.datasets.DATASETS`).
        root: output folder (the dataset root you pass to ``naclip eval --root``).
        num_images: number of images (Cityscapes ones are spread over two cities).
        sizes: ``(H, W)`` per image, cycled; default a few small non-square sizes.
        seed: RNG seed (contents are a pure function of the arguments).
        ignore_frac: fraction of pixels set to 255 in the stored labels.
        wrap: put the dataset in its usual sub-folder (``VOCdevkit/VOC2012`` ...) below ``root``.

    COCO-Object is written as COCO-Stuff ``_labelTrainIds.png`` maps plus the derived
    ``_instanceTrainIds.png`` (things -> 1..80, stuff and 255 -> 0); the returned labels are the
    ``_instanceTrainIds`` contents.
    """
    key = canonical_dataset_name(name)
    spec = DATASETS[key]
    num_images = check_positive_int("num_images", num_images)
    sizes = sizes or [(40, 56), (48, 36), (33, 47)]
    rng = np.random.default_rng(seed)
    base = Path(root)
    if wrap:
        base = base / spec.root_candidates[-1]
    sp = spec.split_name("val")
    img_dir = base / spec.img_dir.format(split=sp)
    ann_dir = base / spec.ann_dir.format(split=sp)
    lo, hi = STORED_VALUE_RANGE[key]
    out: dict[str, np.ndarray] = {}
    ids = []
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        if key == "cityscapes":
            city = ("aachen", "bochum")[i % 2]
            sid = f"{city}/{city}_{i:06d}_000019"
        elif key.startswith("coco"):
            sid = f"{i:012d}"
        elif key == "ade20k":
            sid = f"ADE_val_{i:08d}"
        else:
            sid = f"2008_{i:06d}"
        ids.append(sid)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _save_image(image, img_dir / (sid + spec.img_suffix))
        if key == "coco_object":
            stuff = _blocks(rng, h, w, 0, 170, ignore_frac)
            _save_png(stuff, ann_dir / f"{sid}_labelTrainIds.png", palette=False)
            lab = np.where(stuff < 80, stuff + 1, 0).astype(np.uint8)
        else:
            lab = _blocks(rng, h, w, lo, hi, ignore_frac)
        _save_png(lab, ann_dir / (sid + spec.seg_suffix), palette=key.startswith(("voc", "context")))
        out[sid] = lab
    if spec.split_file is not None:
        split_path = base / spec.split_file.format(split="val")
        split_path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{s}\n" for s in ids).encode("utf-8")
        atomic_write(split_path, lambda f: f.write(text))
    return out


def _size(text: str) -> tuple[int, int]:
    import argparse

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HxW with positive integers (e.g. 48x64), got {text!r}"
        ) from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers (e.g. 48x64), got {text!r}")
    return h, w


def build_parser():
    """The ``python -m naclip.eval.synthetic`` argument parser."""
    import argparse

    from naclip.cli import non_negative_int, positive_int, probability

    p = argparse.ArgumentParser(
        prog="python -m naclip.eval.synthetic",
        description="Write a tiny synthetic benchmark split (random images, block label maps) in the on-disk "
        "layout naclip eval reads, e.g. to check an installation: python -m naclip.eval.synthetic "
        "--dataset voc21 --root /tmp/voc && naclip eval --dataset voc21 --root /tmp/voc --pretrained none.",
    )
    p.add_argument("--dataset", required=True, metavar="NAME", help=f"layout: {', '.join(DATASETS)}")
    p.add_argument("--root", required=True, metavar="DIR", help="output folder (the --root of naclip eval)")
    p.add_argument("--num-images", type=positive_int, default=4, metavar="N", help="images (default 4)")
    p.add_argument(
        "--size",
        type=_size,
        action="append",
        metavar="HxW",
        help="image size, repeat for several (cycled; default 40x56, 48x36, 33x47)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--ignore-frac",
        type=probability,
        default=0.02,
        metavar="F",
        help="share of 255 labels (default 0.02)",
    )
    p.add_argument(
        "--wrap",
        action="store_true",
        help="put it in the dataset's usual sub-folder (VOCdevkit/VOC2012, ...)",
    )
    return p


def main(argv=None) -> int:
    """``python -m naclip.eval.synthetic``: write the dataset, print where; exit status 2 on bad input."""
    import sys

    args = build_parser().parse_args(argv)
    try:
        labels = make_synthetic_dataset(
            args.dataset, args.root, num_images=args.num_images, sizes=args.size, seed=args.seed,
            ignore_frac=args.ignore_frac, wrap=args.wrap,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    key = canonical_dataset_name(args.dataset)
    root = Path(args.root) / DATASETS[key].root_candidates[-1] if args.wrap else Path(args.root)
    print(f"wrote {len(labels)} {key} images and labels under {str(root)!r} (naclip eval --root {root})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
