"""Readers for the 8 benchmark datasets in their standard (mmseg 1.x) on-disk layouts.

Every reader yields, per sample, the RGB image (uint8 ``[H, W, 3]``, raw pixel order, no EXIF rotation) and
the ground truth in the benchmark's convention (uint8 ``[H, W]``, class ids ``0..C-1``, 255 = ignore).
Layouts under ``root`` (split ``val``) and label conventions:

* ``voc21``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``, split file
  ``ImageSets/Segmentation/val.txt``; labels as stored (0 = background, 1..20, 255).
* ``voc20``: the same files; ``reduce_zero_label`` (background 0 -> 255, k -> k-1).
* ``context60``: ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``, split file
  ``ImageSets/SegmentationContext/val.txt`` (VOC2010); labels as stored (0 = background, 1..59).
* ``context59``: the same files; ``reduce_zero_label``.
* ``coco_object``: ``images/val2017/<id>.jpg``, ``annotations/val2017/<id>_instanceTrainIds.png`` (made by
  :mod:`naclip.eval.convert_coco_object`); as stored (0 = stuff and unlabeled, things 1..80).
* ``coco_stuff``: ``images/val2017/<id>.jpg``, ``annotations/val2017/<id>_labelTrainIds.png``; as stored
  (171 train ids, 255).
* ``cityscapes``: ``leftImg8bit/val/<city>/<id>_leftImg8bit.png``,
  ``gtFine/val/<city>/<id>_gtFine_labelTrainIds.png``; as stored (19 train ids, 255).
* ``ade20k``: ``images/validation/<id>.jpg``, ``annotations/validation/<id>.png``; ``reduce_zero_label``
  (0 = "other").

``reduce_zero_label`` is mmseg's: ``0 -> 255``, ``255 -> 255``, ``v -> v - 1`` otherwise. ``root`` may be the
dataset folder itself or a parent holding it under its usual name (``VOCdevkit/VOC2012``, ``VOC2010``,
``coco_stuff164k``, ``cityscapes``, ``ADEChallengeData2016``). Datasets without a split file (COCO,
Cityscapes, ADE20k) list their image folder recursively, sorted by path (mmseg's order). Label values outside
``0..C-1`` other than 255 are kept (not clipped, not dropped); :mod:`naclip.eval.metrics` counts and reports
them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from naclip.eval.metrics import IGNORE_INDEX
from naclip.presets import get_preset

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "EvalDataset",
    "Sample",
    "canonical_dataset_name",
    "load_label_png",
    "reduce_zero_label",
]


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of one benchmark layout (see the module table).

    ``img_dir``/``ann_dir``/``split_file`` may contain ``{split}`` (after ``split_names`` mapping). ``title``
    and ``num_classes`` come from the preset of the same name (:func:`naclip.presets.get_preset`), the one
    place that defines them.
    """

    name: str
    reduce_zero_label: bool
    root_candidates: tuple[str, ...]
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_suffix: str
    split_file: str | None = None
    split_names: tuple[tuple[str, str], ...] = ()

    def split_name(self, split: str) -> str:
        return dict(self.split_names).get(split, split)

    @property
    def title(self) -> str:
        """Human-readable name, the preset's ``title``."""
        return get_preset(self.name).title

    @property
    def num_classes(self) -> int:
        """Number of classes ``C`` (labels ``0..C-1``), the preset's class count."""
        return get_preset(self.name).classes.num_classes


_VOC = dict(
    root_candidates=(".", "VOC2012", "VOCdevkit/VOC2012"),
    img_dir="JPEGImages",
    ann_dir="SegmentationClass",
    img_suffix=".jpg",
    seg_suffix=".png",
    split_file="ImageSets/Segmentation/{split}.txt",
)
_CONTEXT = dict(
    root_candidates=(".", "VOC2010", "VOCdevkit/VOC2010"),
    img_dir="JPEGImages",
    ann_dir="SegmentationClassContext",
    img_suffix=".jpg",
    seg_suffix=".png",
    split_file="ImageSets/SegmentationContext/{split}.txt",
)
_COCO = dict(
    root_candidates=(".", "coco_stuff164k"),
    img_dir="images/{split}",
    ann_dir="annotations/{split}",
    img_suffix=".jpg",
    split_names=(("val", "val2017"), ("train", "train2017")),
)

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec("voc21", False, **_VOC),
        DatasetSpec("voc20", True, **_VOC),
        DatasetSpec("context60", False, **_CONTEXT),
        DatasetSpec("context59", True, **_CONTEXT),
        DatasetSpec("coco_object", False, seg_suffix="_instanceTrainIds.png", **_COCO),
        DatasetSpec("coco_stuff", False, seg_suffix="_labelTrainIds.png", **_COCO),
        DatasetSpec(
            "cityscapes",
            False,
            root_candidates=(".", "cityscapes"),
            img_dir="leftImg8bit/{split}",
            ann_dir="gtFine/{split}",
            img_suffix="_leftImg8bit.png",
            seg_suffix="_gtFine_labelTrainIds.png",
        ),
        DatasetSpec(
            "ade20k",
            True,
            root_candidates=(".", "ADEChallengeData2016", "ade/ADEChallengeData2016"),
            img_dir="images/{split}",
            ann_dir="annotations/{split}",
            img_suffix=".jpg",
            seg_suffix=".png",
            split_names=(("val", "validation"), ("train", "training")),
        ),
    )
}

_ALIASES = {
    "voc": "voc21",
    "pc60": "context60",
    "pascal_context60": "context60",
    "pc59": "context59",
    "pascal_context59": "context59",
    "coco-object": "coco_object",
    "cocoobject": "coco_object",
    "coco_obj": "coco_object",
    "object": "coco_object",
    "coco-stuff": "coco_stuff",
    "coco_stuff171": "coco_stuff",
    "coco_stuff164k": "coco_stuff",
    "stuff": "coco_stuff",
    "city": "cityscapes",
    "city_scapes": "cityscapes",
    "ade": "ade20k",
}


def canonical_dataset_name(name: str) -> str:
    """``name`` or one of its aliases (case-insensitive, e.g. ``pc59``, ``city``, ``ade``) -> key of
    DATASETS."""
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)} (or an alias)")
    return key


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. ``id``: split-file id, or the image path relative to the image folder without
    the image suffix (``frankfurt/frankfurt_000000_000294``); ``stem``: the image file name without
    extension."""

    index: int
    id: str
    stem: str
    image_path: Path
    label_path: Path


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label``: ``0 -> 255``, ``255 -> 255``, ``v -> v - 1``; uint8 in, uint8 out."""
    lab = np.asarray(label)
    out = lab.astype(np.int16) - 1
    out[(lab == 0) | (lab == IGNORE_INDEX)] = IGNORE_INDEX
    return out.astype(np.uint8)


def load_label_png(path: str | os.PathLike, *, what: str = "label") -> np.ndarray:
    """Read a single-channel label PNG (palette indices or grey values) as uint8 ``[H, W]``.

    Raises ValueError naming the file for multi-channel images (e.g. colour-coded masks) and values > 255.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ValueError(
                    f"{what} file {path} has image mode {mode!r}; expected a single-channel label map "
                    f"(palette 'P' or greyscale 'L' PNG whose values are class ids), not a colour image"
                )
            arr = np.array(im)
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from e
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise ValueError(
            f"{what} file {path} holds values in {int(arr.min())}..{int(arr.max())}; "
            "expected 0..255 (255 = ignore)"
        )
    return arr.astype(np.uint8)


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e


def _find_root(spec: DatasetSpec, root: Path, split: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} for dataset {spec.name!r} is not a directory")
    img_rel = spec.img_dir.format(split=spec.split_name(split))
    tried = []
    for cand in spec.root_candidates:
        base = (root / cand) if cand != "." else root
        tried.append(base)
        if (base / img_rel).is_dir():
            return base
    first_level = img_rel.split("/")[0]
    hints = [str(b) for b in tried]
    present = next((b for b in tried if (b / first_level).is_dir()), None)
    detail = f"; {present / first_level} exists but has no {img_rel!r} for split {split!r}" if present else ""
    raise FileNotFoundError(
        f"dataset {spec.name!r}: image folder {img_rel!r} not found under --root {root} "
        f"(looked in {', '.join(hints)}){detail}. Expected layout: images {img_rel}/<id>{spec.img_suffix}, "
        f"labels {spec.ann_dir.format(split=spec.split_name(split))}/<id>{spec.seg_suffix}"
        + (f", split file {spec.split_file.format(split=split)}" if spec.split_file else "")
    )


def _coco_object_hint(ann_dir: Path, stems: list[str]) -> str:
    probe = stems[:20]
    if any((ann_dir / f"{s}_labelTrainIds.png").is_file() or (ann_dir / f"{s}.png").is_file() for s in probe):
        return (
            " COCO-Object labels are derived from the COCO-Stuff annotations; create them with "
            f"`python -m naclip.eval.convert_coco_object --root {ann_dir.parent.parent}`"
        )
    return ""


class EvalDataset:
    """Map-style dataset (usable with ``torch.utils.data.DataLoader``) over one benchmark split.

    Args:
        name: a key of :data:`DATASETS` or an alias.
        root: dataset root (see module docstring).
        split: ``"val"`` (default) or another split present on disk.
        pred_dir: optional folder of predicted label PNGs (``<stem>.png``, ``<stem>_mask.png`` as written by
            ``naclip segment``, or ``<id>.png``, looked up in this order); items then also hold
            ``"pred"`` (uint8 ``[H, W]``) — used by ``naclip score``.

    All image/label (and prediction) files are checked to exist at construction (fail fast, listing what is
    missing). ``dataset[i]`` is a dict: ``index`` (int), ``id``, ``stem`` (str), ``image``
    (uint8 ``[H, W, 3]`` RGB), ``label`` (uint8 ``[H, W]``, converted), and ``pred`` when ``pred_dir`` is
    given.
    """

    def __init__(
        self,
        name: str,
        root: str | os.PathLike,
        *,
        split: str = "val",
        pred_dir: str | os.PathLike | None = None,
    ) -> None:
        self.spec = DATASETS[canonical_dataset_name(name)]
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty str, got {split!r}")
        self.split = split
        self.root = _find_root(self.spec, Path(root).expanduser(), split)
        self.samples = self._list_samples()
        self.pred_paths: list[Path] | None = None
        if pred_dir is not None:
            self.pred_paths = self._find_predictions(Path(pred_dir).expanduser())

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def _list_samples(self) -> list[Sample]:
        spec, sp = self.spec, self.spec.split_name(self.split)
        img_dir = self.root / spec.img_dir.format(split=sp)
        ann_dir = self.root / spec.ann_dir.format(split=sp)
        if not ann_dir.is_dir():
            raise FileNotFoundError(
                f"dataset {spec.name!r}: label folder {ann_dir} is missing (images found in {img_dir})"
            )
        if spec.split_file is not None:
            split_path = self.root / spec.split_file.format(split=self.split)
            if not split_path.is_file():
                raise FileNotFoundError(
                    f"dataset {spec.name!r}: split file {split_path} is missing "
                    f"(it lists the {self.split!r} ids)"
                )
            ids = [ln.strip() for ln in split_path.read_text().splitlines() if ln.strip()]
            if not ids:
                raise ValueError(f"dataset {spec.name!r}: split file {split_path} lists no image ids")
        else:
            paths = sorted(
                str(p.relative_to(img_dir)) for p in img_dir.rglob(f"*{spec.img_suffix}") if p.is_file()
            )
            ids = [p[: -len(spec.img_suffix)] for p in paths]
            if not ids:
                raise FileNotFoundError(
                    f"dataset {spec.name!r}: no '*{spec.img_suffix}' images under {img_dir}"
                )
        samples = [
            Sample(
                index=i,
                id=s,
                stem=Path(s + spec.img_suffix).stem,
                image_path=img_dir / (s + spec.img_suffix),
                label_path=ann_dir / (s + spec.seg_suffix),
            )
            for i, s in enumerate(ids)
        ]
        missing_img = [s.image_path for s in samples if not s.image_path.is_file()]
        if missing_img:
            raise FileNotFoundError(
                f"dataset {spec.name!r}: {len(missing_img)} of {len(samples)} images listed are missing, "
                f"e.g. {', '.join(map(str, missing_img[:3]))}"
            )
        missing_lab = [s for s in samples if not s.label_path.is_file()]
        if missing_lab:
            hint = ""
            if spec.name == "coco_object":
                hint = _coco_object_hint(ann_dir, [Path(s.id).name for s in missing_lab])
            raise FileNotFoundError(
                f"dataset {spec.name!r}: {len(missing_lab)} of {len(samples)} images have no label file, "
                "e.g. "
                + ", ".join(f"{s.image_path.name} -> {s.label_path}" for s in missing_lab[:3])
                + "."
                + hint
            )
        return samples

    def _find_predictions(self, pred_dir: Path) -> list[Path]:
        if not pred_dir.is_dir():
            raise FileNotFoundError(f"--pred folder {pred_dir} is not a directory")
        out, missing = [], []
        for s in self.samples:
            cands = [pred_dir / f"{s.stem}.png", pred_dir / f"{s.stem}_mask.png", pred_dir / f"{s.id}.png"]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                missing.append(cands[0])
            out.append(hit)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.samples)} predictions are missing in {pred_dir} "
                "(expected <image stem>.png or <image stem>_mask.png), e.g. "
                + ", ".join(str(m) for m in missing[:3])
            )
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> np.ndarray:
        """Ground truth of sample ``index`` in the benchmark convention (uint8 ``[H, W]``)."""
        label = load_label_png(self.samples[index].label_path)
        return reduce_zero_label(label) if self.spec.reduce_zero_label else label

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = _load_image(s.image_path)
        label = self.load_label(index)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"image {s.image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but its label "
                f"{s.label_path} is {label.shape[1]}x{label.shape[0]}"
            )
        item = {"index": s.index, "id": s.id, "stem": s.stem, "image": image, "label": label}
        if self.pred_paths is not None:
            pred = load_label_png(self.pred_paths[index], what="prediction")
            if pred.shape != label.shape:
                raise ValueError(
                    f"prediction {self.pred_paths[index]} is {pred.shape[1]}x{pred.shape[0]} (WxH) but the "
                    f"label {s.label_path} is {label.shape[1]}x{label.shape[0]}; predictions must be at the "
                    "original resolution"
                )
            item["pred"] = pred
        return item
