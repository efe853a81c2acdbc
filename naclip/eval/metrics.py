"""Dataset-level segmentation metrics with the exact definitions of mmseg's ``IoUMetric``.

Everything is computed from one integer **joint histogram** ``H`` of shape ``[256, 256]`` (int64), accumulated
over all images at the original label resolution::

    H[g, p] = number of pixels whose ground-truth value is g and whose predicted value is min(p, 255)

Ground-truth values are the *converted* labels (after ``reduce_zero_label`` etc.), so row ``IGNORE_INDEX``
(255) holds the ignored pixels, rows ``0..C-1`` the valid classes and rows ``C..254`` label values outside the
class range (kept, counted and reported rather than silently dropped). Columns ``C..255`` are predictions
outside the class range (only possible when scoring PNGs written by other tools).

With ``C`` classes, ``valid = rows != 255`` and ``k`` in ``0..C-1`` (mmseg ``intersect_and_union`` +
``total_area_to_metrics``, which histogram labels and predictions over ``[0, C-1]`` after removing ignored
pixels)::

    intersect[k]  = H[k, k]
    area_label[k] = sum_p H[k, p]                (every prediction, also out-of-range ones)
    area_pred[k]  = sum_{g != 255} H[g, k]       (also pixels whose label is out of range, as in mmseg)
    union[k]      = area_label[k] + area_pred[k] - intersect[k]
    IoU[k] = intersect[k] / union[k]             Acc[k] = intersect[k] / area_label[k]
    aAcc   = sum_k intersect[k] / sum_k area_label[k]
    mIoU   = nanmean_k IoU[k]                    mAcc   = nanmean_k Acc[k]

A class with zero union (absent from both ground truth and prediction) has IoU = NaN and is excluded from
mIoU; a class absent from the ground truth has Acc = NaN and is excluded from mAcc (0/0 -> NaN, as in mmseg).
All counts are exact int64 (mmseg sums float32 histograms, which can differ in the 7th significant digit on
very large datasets); ratios are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from naclip._validate import check_int

IGNORE_INDEX = 255
HIST_SIZE = 256  # label and prediction values are uint8-ranged; see joint_histogram

__all__ = [
    "HIST_SIZE",
    "IGNORE_INDEX",
    "Metrics",
    "compute_metrics",
    "joint_histogram",
]


def _as_long_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got numpy dtype {x.dtype}")
        return torch.from_numpy(x.astype(np.int64, copy=False))
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got torch dtype {x.dtype}")
        return x.detach().to("cpu", torch.int64)
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def joint_histogram(label: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Joint histogram of one image: ``H[g, p] = #{pixels : label == g and min(pred, 255) == p}``.

    Args:
        label: ``[H, W]`` integer ground truth with values in ``0..255`` (255 = ignore), already converted to
            the dataset's convention (see :mod:`naclip.eval.datasets`).
        pred: ``[H, W]`` integer prediction, same shape; values ``>= 255`` are clipped to 255 (they are
            outside every class range anyway), negative values are an error.

    Returns:
        ``[256, 256]`` int64 CPU tensor. Summing these over images gives the dataset histogram of
        :func:`compute_metrics` (integer addition: order-independent and exact).
    """
    g = _as_long_tensor(label, "label")
    p = _as_long_tensor(pred, "pred")
    if g.ndim != 2:
        raise ValueError(f"label must be 2-D [H, W], got shape {tuple(g.shape)}")
    if p.shape != g.shape:
        raise ValueError(
            f"pred must have the label's shape {tuple(g.shape)} (original resolution), got {tuple(p.shape)}"
        )
    if g.numel():
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"label values must lie in 0..255, got min {lo}, max {hi}")
        if int(p.min()) < 0:
            raise ValueError(f"pred values must be >= 0, got min {int(p.min())}")
    flat = g.reshape(-1) * HIST_SIZE + p.reshape(-1).clamp_max(HIST_SIZE - 1)
    return torch.bincount(flat, minlength=HIST_SIZE * HIST_SIZE).reshape(HIST_SIZE, HIST_SIZE)


@dataclass(frozen=True)
class Metrics:
    """Metrics of one dataset histogram. Ratios are fractions in [0, 1] (NaN = undefined, see module doc).

    Attributes:
        iou, acc: per-class float64 arrays ``[C]``.
        miou, macc, aacc: means as defined in the module docstring (NaN when no class is defined).
        intersect, union, area_label, area_pred: per-class int64 arrays ``[C]``.
        ignored_pixels: pixels with label 255.
        out_of_range_label_pixels: ``{label value: pixels}`` for label values in ``C..254``.
        out_of_range_pred_pixels: pixels (non-ignored label) whose prediction is ``>= C``.
    """

    num_classes: int
    iou: np.ndarray
    acc: np.ndarray
    miou: float
    macc: float
    aacc: float
    intersect: np.ndarray
    union: np.ndarray
    area_label: np.ndarray
    area_pred: np.ndarray
    ignored_pixels: int
    out_of_range_label_pixels: dict[int, int]
    out_of_range_pred_pixels: int


def _nanmean(x: np.ndarray) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


def compute_metrics(hist: torch.Tensor | np.ndarray, num_classes: int) -> Metrics:
    """mmseg ``IoUMetric`` metrics from a ``[256, 256]`` joint histogram (see module docstring).

    Args:
        hist: integer ``[256, 256]`` histogram from :func:`joint_histogram` (summed over images).
        num_classes: ``C``, 1..255.
    """
    num_classes = check_int("num_classes", num_classes, minimum=1, maximum=255)
    h = np.asarray(hist.cpu().numpy() if isinstance(hist, torch.Tensor) else hist)
    if h.shape != (HIST_SIZE, HIST_SIZE):
        raise ValueError(f"hist must have shape (256, 256), got {h.shape}")
    if h.dtype.kind not in "iu":
        raise TypeError(f"hist must hold integers, got dtype {h.dtype}")
    h = h.astype(np.int64, copy=False)
    c = num_classes
    valid_rows = np.ones(HIST_SIZE, dtype=bool)
    valid_rows[IGNORE_INDEX] = False
    intersect = np.diagonal(h)[:c].copy()
    area_label = h[:c, :].sum(axis=1)
    area_pred = h[valid_rows, :c].sum(axis=0)
    union = area_label + area_pred - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union.astype(np.float64)
        acc = intersect / area_label.astype(np.float64)
        total_label = area_label.sum()
        aacc = float(intersect.sum() / total_label) if total_label else math.nan
    oor_rows = h[c:IGNORE_INDEX, :].sum(axis=1)
    oor = {int(c + i): int(n) for i, n in enumerate(oor_rows) if n}
    return Metrics(
        num_classes=c,
        iou=iou,
        acc=acc,
        miou=_nanmean(iou),
        macc=_nanmean(acc),
        aacc=aacc,
        intersect=intersect,
        union=union,
        area_label=area_label,
        area_pred=area_pred,
        ignored_pixels=int(h[IGNORE_INDEX, :].sum()),
        out_of_range_label_pixels=oor,
        out_of_range_pred_pixels=int(h[valid_rows, c:].sum()),
    )
