"""Structured outputs of a segmentation: class areas / JSON summary, per-class heat maps, and the formats of
other tools (the transformers ``image-segmentation`` pipeline, ``supervision.Detections``).

Every function takes the parts of a :class:`naclip.segmenter.SegmentationResult` it needs (``labels`` int
``[H, W]``, ``probs`` float ``[C, H, W]``, ``class_names``), so this module depends on :mod:`naclip.io` only.

* :func:`class_areas`: per class ``index``, ``name``, ``pixels = #{labels == index}`` (exact integer counts),
  ``fraction = pixels / (H·W)`` and ``mean_prob`` = mean of ``probs[index]`` over the pixels labelled
  ``index`` (``None`` when the class covers no pixel); when the mask holds :data:`naclip.io.UNKNOWN_LABEL`
  (pixels below ``prob_thd`` without a background class) a last entry ``{"index": 255, "name": "unknown",
  ..., "mean_prob": None}`` counts them, so the pixels always sum to ``H·W`` and the fractions to 1.
* :func:`summary`: ``{"height", "width", "classes": class_areas(...), "settings": {...}}`` (the ``--json``
  file).
* :func:`render_heatmaps`: a grid of per-class probability maps on one fixed ``[0, 1]`` colour scale (so
  colours compare across classes), each titled with the class name and its area, and a colour bar. Drawn with
  Pillow only, so ``--heatmaps`` needs no extra dependency.
* :func:`to_hf` / :func:`to_supervision`: the classes present, one entry / detection each.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from naclip import _fonts, io
from naclip._validate import check_int

__all__ = [
    "HEATMAP_TILE",
    "class_areas",
    "heatmap_colors",
    "render_heatmaps",
    "save_heatmaps",
    "save_json",
    "summary",
    "to_hf",
    "to_supervision",
]

#: Long side in pixels of one heat-map tile (maps are resized to it, keeping the aspect ratio).
HEATMAP_TILE = 256
_TEXT_PX = 12  # em size of the titles and colour-bar labels
# Colour ramp of the heat maps: probability 0 -> 1 through these anchors (dark blue, blue, teal, green,
# yellow; luminance increases monotonically, so the maps also read in grey), interpolated to 256 entries.
_RAMP_ANCHORS = ((24, 16, 64), (38, 82, 158), (32, 150, 148), (120, 200, 80), (250, 232, 70))


def _arrays(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    lab = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    pr = probs.detach().cpu().float().numpy() if hasattr(probs, "detach") else np.asarray(probs, np.float32)
    if lab.ndim != 2 or pr.ndim != 3 or pr.shape[1:] != lab.shape:
        raise ValueError(f"labels/probs: expected [H, W] and [C, H, W], got {lab.shape} and {pr.shape}")
    return lab, pr


def class_areas(labels: Any, probs: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per class ``{"index", "name", "pixels", "fraction", "mean_prob"}`` (see the module docstring),
    in class order, absent classes included, then the "unknown" entry if the mask has unknown pixels."""
    lab, pr = _arrays(labels, probs)
    n_cls = pr.shape[0]
    if len(class_names) != n_cls:
        raise ValueError(f"class_names: expected {n_cls} names, got {len(class_names)}")
    flat = lab.reshape(-1)
    known = flat < n_cls
    unknown = int(np.count_nonzero(flat == io.UNKNOWN_LABEL)) if n_cls <= io.UNKNOWN_LABEL else 0
    if flat.size and (flat.min() < 0 or int(known.sum()) + unknown != flat.size):
        raise ValueError(
            f"labels: expected values in [0, {n_cls}) or {io.UNKNOWN_LABEL} (unknown), "
            f"got [{flat.min()}, {flat.max()}]"
        )
    flat_known = flat[known]
    pixels = np.bincount(flat_known, minlength=n_cls)
    # sum of probs[c] over the pixels labelled c, for every c at once
    own = np.take_along_axis(pr.reshape(n_cls, -1)[:, known], flat_known[None, :], axis=0)[0]
    prob_sums = np.bincount(flat_known, weights=own.astype(np.float64), minlength=n_cls)
    total = flat.size
    extra = [{"index": io.UNKNOWN_LABEL, "name": io.UNKNOWN_NAME, "pixels": unknown,
              "fraction": unknown / total, "mean_prob": None}] if unknown else []  # fmt: skip
    return [
        {
            "index": c,
            "name": str(class_names[c]),
            "pixels": int(pixels[c]),
            "fraction": float(pixels[c]) / total,
            "mean_prob": float(prob_sums[c] / pixels[c]) if pixels[c] else None,
        }
        for c in range(n_cls)
    ] + extra


def summary(
    labels: Any, probs: Any, class_names: Sequence[str], settings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON summary ``{"height", "width", "classes", "settings"}`` of a segmentation."""
    lab, _ = _arrays(labels, probs)
    return {
        "height": int(lab.shape[0]),
        "width": int(lab.shape[1]),
        "classes": class_areas(labels, probs, class_names),
        "settings": dict(settings or {}),
    }


def save_json(path: str | os.PathLike, data: Mapping[str, Any], *, protect: Sequence[Any] = ()) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return io.atomic_write(path, lambda f: f.write(text.encode("utf-8")), protect=protect)


# ----------------------------------------------------------------------------------------------- heat maps


def heatmap_colors() -> np.ndarray:
    """The heat-map colour table, ``uint8 [256, 3]`` (entry ``i`` is probability ``i / 255``)."""
    anchors = np.asarray(_RAMP_ANCHORS, dtype=np.float64)
    x = np.linspace(0.0, len(anchors) - 1, 256)
    lo = np.minimum(x.astype(int), len(anchors) - 2)
    t = (x - lo)[:, None]
    return np.round(anchors[lo] * (1 - t) + anchors[lo + 1] * t).astype(np.uint8)


def _tile(prob: np.ndarray, size: tuple[int, int], lut: np.ndarray) -> Image.Image:
    resized = Image.fromarray(prob.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    idx = np.clip(np.round(np.asarray(resized) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(lut[idx])


def _colour_bar(height: int, lut: np.ndarray) -> Image.Image:
    bar_w, pad = 16, 6
    label_w = _fonts.text_size("1.00", _TEXT_PX)[0] + pad
    img = Image.new("RGB", (bar_w + label_w + 2 * pad, height + 2 * pad), "white")
    ramp = lut[np.linspace(255, 0, height).round().astype(int)]  # top = 1
    img.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1)), (pad, pad))
    draw = ImageDraw.Draw(img)
    draw.rectangle([pad - 1, pad - 1, pad + bar_w, pad + height], outline="black")
    for value in (1.0, 0.5, 0.0):
        y = pad + round((1.0 - value) * (height - 1))
        draw.line([pad + bar_w, y, pad + bar_w + 3, y], fill="black")
        _text_centred(img, (pad + bar_w + 5, y), f"{value:.2f}")
    return img


def render_heatmaps(
    probs: Any, class_names: Sequence[str], *, labels: Any = None, columns: int | None = None
) -> Image.Image:
    """A grid of the ``C`` probability maps ``probs [C, H, W]`` (values clipped to ``[0, 1]``), each resized
    to :data:`HEATMAP_TILE` px on its long side and titled with its class name (and the class's share of
    the pixels when ``labels`` is given), with a colour bar on the right; ``columns`` default
    ``min(C, 4)``."""
    pr = probs.detach().cpu().float().numpy() if hasattr(probs, "detach") else np.asarray(probs, np.float32)
    if pr.ndim != 3 or len(class_names) != pr.shape[0]:
        raise ValueError(f"probs: expected [C, H, W] with C = {len(class_names)} names, got {pr.shape}")
    n_cls, h, w = pr.shape
    cols = (
        min(n_cls, 4)
        if columns is None
        else check_int("columns", columns, minimum=1, expected="an int >= 1 or None")
    )
    titles = [str(n) for n in class_names]
    if labels is not None:
        areas = class_areas(labels, pr, class_names)[:n_cls]
        titles = [f"{a['name']} ({a['fraction']:.1%})" for a in areas]
    scale = HEATMAP_TILE / max(h, w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    lut, pad, title_h = heatmap_colors(), 6, 16
    rows = math.ceil(n_cls / cols)
    cell_w, cell_h = tw + pad, th + title_h + pad
    bar = _colour_bar(th, lut)
    canvas = Image.new("RGB", (cols * cell_w + pad + bar.width, rows * cell_h + pad), "white")
    for c in range(n_cls):
        x, y = pad + (c % cols) * cell_w, pad + (c // cols) * cell_h
        _text_centred(canvas, (x, y + title_h // 2), _fit(titles[c], tw))
        canvas.paste(_tile(np.clip(pr[c], 0.0, 1.0), (tw, th), lut), (x, y + title_h))
    canvas.paste(bar, (cols * cell_w + pad, pad + title_h - 6))
    return canvas


def _text_centred(canvas: Image.Image, xy: tuple[int, int], text: str) -> None:
    """Draw ``text`` left-aligned and vertically centred on ``xy`` (the legend's fonts, any script)."""
    _fonts.draw_text(canvas, (xy[0], xy[1] - _fonts.text_size(text, _TEXT_PX)[1] // 2), text, _TEXT_PX)


def _fit(text: str, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if _fonts.text_size(text, _TEXT_PX)[0] <= width:
        return text
    while text and _fonts.text_size(text + "…", _TEXT_PX)[0] > width:
        text = text[:-1]
    return text + "…"


def save_heatmaps(
    path: str | os.PathLike, probs: Any, class_names: Sequence[str], *, labels: Any = None, protect=()
) -> Path:
    """Write :func:`render_heatmaps` as PNG (``path`` must end in .png), atomically."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: heat maps are written as .png, got {str(path)!r}")
    img = render_heatmaps(probs, class_names, labels=labels)
    return io.atomic_write(path, lambda f: img.save(f, format="PNG"), protect=protect)


# ------------------------------------------------------------------------------------------- integrations


def to_hf(labels: Any, probs: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The transformers ``image-segmentation`` pipeline output: for each class present, in class order,
    ``{"label": name, "score": mean_prob, "mask": PIL "L" image (255 on the class, 0 elsewhere)}``."""
    lab, _ = _arrays(labels, probs)
    out = []
    for area in class_areas(labels, probs, class_names):
        if area["pixels"] and area["mean_prob"] is not None:  # the classes present ("unknown" is none)
            mask = Image.fromarray(np.where(lab == area["index"], 255, 0).astype(np.uint8), mode="L")
            out.append({"label": area["name"], "score": area["mean_prob"], "mask": mask})
    return out


def to_supervision(labels: Any, probs: Any, class_names: Sequence[str]) -> Any:
    """A ``supervision.Detections`` with one detection per class present: ``mask`` bool ``[N, H, W]``,
    ``xyxy`` the mask's bounding box (inclusive pixel coordinates, float32), ``class_id`` the class index,
    ``confidence`` its ``mean_prob`` and ``data["class_name"]``. Needs the optional ``supervision`` package
    (``ImportError`` naming it otherwise)."""
    try:
        import supervision as sv
    except ImportError:
        raise ImportError(
            "to_supervision needs the optional 'supervision' package: pip install supervision"
        ) from None
    lab, _ = _arrays(labels, probs)
    present = [a for a in class_areas(labels, probs, class_names) if a["mean_prob"] is not None]
    masks = np.stack([lab == a["index"] for a in present]) if present else np.zeros((0, *lab.shape), bool)
    xyxy = np.zeros((len(present), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        xyxy[i] = (xs.min(), ys.min(), xs.max(), ys.max())
    return sv.Detections(
        xyxy=xyxy,
        mask=masks,
        class_id=np.array([a["index"] for a in present], dtype=int),
        confidence=np.array([a["mean_prob"] for a in present], dtype=np.float32),
        data={"class_name": np.array([a["name"] for a in present], dtype=str)},
    )
