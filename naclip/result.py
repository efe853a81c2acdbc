"""A segmentation result and its writers: :class:`SegmentationResult` (labels, probs, names, settings).

Labels ``[H, W]`` and probabilities ``[C, H, W]`` at the original image resolution, on the CPU; the writers
(mask PNG, overlay, ``.npy``, JSON, heat maps) write atomically through :mod:`naclip.io` /
:mod:`naclip.outputs` and never onto the input file (:attr:`SegmentationResult.source`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naclip import io

__all__ = ["SegmentationResult"]


@dataclass
class SegmentationResult:
    """A segmentation at the original image resolution.

    Attributes:
        labels: integer tensor ``[H, W]`` (cpu), class index per pixel, in the smallest dtype holding the
            classes (``uint8`` up to 256 classes, then ``int16``, ``int32``; :func:`naclip.tiles.label_dtype`;
            use ``labels.long()`` to index with it).
        probs: ``FloatTensor [C, H, W]`` (cpu), per-class probabilities (max over synonyms, renormalised to
            sum 1), or ``None`` when they were not kept (larger than ``SegmentConfig.memory_budget``, or
            ``keep_probs=False``; stream them to a file with ``predict(..., probs_path=...)``).
        class_names: ``C`` display names (``class_names[labels[y, x]]``).
        logits: raw cosine logits ``[Q, h, w]`` at model-input resolution (before resizing, PAMR and softmax),
            only when requested (``return_logits=True``), else ``None``.
        image: the uint8 RGB input ``[H, W, 3]`` when known (used by :meth:`save_overlay`).
        source: the input file path when the image was given as a path (never overwritten by the writers).
        palette: ``uint8 [256, 3]`` colours of the label values for the writers
            (:func:`naclip.io.label_palette`; ``None``: VOC). Labels may hold
            :data:`naclip.io.UNKNOWN_LABEL` (pixels below ``prob_thd`` when no user class is a background).
        settings: the settings :meth:`Segmenter.predict` used (mode, PAMR, threshold, sizes, model, and
            ``below_thd_label``, the label of pixels below the threshold), as written into :meth:`to_json`.
    """

    labels: torch.Tensor
    probs: torch.Tensor | None
    class_names: list[str]
    logits: torch.Tensor | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    source: Path | None = None
    palette: np.ndarray | None = field(default=None, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def _protect(self, protect: Iterable[os.PathLike | str]) -> list[os.PathLike | str]:
        return [*([self.source] if self.source is not None else []), *protect]

    def save_mask(self, path: str | os.PathLike, *, protect: Iterable[os.PathLike | str] = ()) -> Path:
        """Palette PNG of ``labels`` (VOC palette), written atomically; never onto the input file."""
        return io.save_mask(path, self.labels, palette=self.palette, protect=self._protect(protect))

    def save_overlay(
        self,
        path: str | os.PathLike,
        image: Any = None,
        *,
        alpha: float = io.OVERLAY_ALPHA,
        protect: Iterable[os.PathLike | str] = (),
    ) -> Path:
        """Colour overlay of ``labels`` on ``image`` (default: the predicted image) with a legend,
        atomically."""
        img = self.image if image is None else image
        if img is None:
            raise ValueError("image: no image stored in this result; pass the image to overlay")
        return io.save_overlay(
            path,
            img,
            self.labels,
            self.class_names,
            alpha=alpha,
            palette=self.palette,
            protect=self._protect(protect),
        )

    def save_probs(self, path: str | os.PathLike, *, protect: Iterable[os.PathLike | str] = ()) -> Path:
        """``probs`` as a float32 ``.npy`` ``[C, H, W]``, written atomically."""
        if self.probs is None:
            raise ValueError(
                "probs: this result did not keep its probabilities (they exceed SegmentConfig.memory_budget "
                "or keep_probs=False); pass probs_path= to predict to stream them to a .npy file"
            )
        return io.save_probs(path, self.probs, protect=self._protect(protect))

    def summary(self) -> dict[str, Any]:
        """``{"height", "width", "classes": [{"index", "name", "pixels", "fraction", "mean_prob"}],
        "settings"}`` (:func:`naclip.outputs.summary`: exact pixel counts, ``mean_prob`` over the class's
        own pixels)."""
        from naclip import outputs

        return outputs.summary(self.labels, self.probs, self.class_names, self.settings)

    def to_json(self, *, indent: int | None = 2) -> str:
        """:meth:`summary` as JSON text."""
        import json

        return json.dumps(self.summary(), indent=indent, ensure_ascii=False, allow_nan=False)

    def save_json(self, path: str | os.PathLike, *, protect: Iterable[os.PathLike | str] = ()) -> Path:
        """:meth:`summary` as a UTF-8 JSON file, written atomically."""
        from naclip import outputs

        return outputs.save_json(path, self.summary(), protect=self._protect(protect))

    def save_heatmaps(self, path: str | os.PathLike, *, protect: Iterable[os.PathLike | str] = ()) -> Path:
        """Titled grid of the per-class probability maps with a colour bar (PNG), written atomically
        (:func:`naclip.outputs.render_heatmaps`)."""
        from naclip import outputs

        return outputs.save_heatmaps(
            path, self.probs, self.class_names, labels=self.labels, protect=self._protect(protect)
        )

    def to_hf(self) -> list[dict[str, Any]]:
        """transformers ``image-segmentation`` pipeline format: per class present, ``{"label", "score"
        (mean probability over its pixels), "mask" (PIL "L", 255 on the class)}``."""
        from naclip import outputs

        return outputs.to_hf(self.labels, self.probs, self.class_names)

    def to_supervision(self) -> Any:
        """``supervision.Detections`` (masks, boxes, class ids, mean probabilities, class names) of the
        classes present; needs the optional ``supervision`` package."""
        from naclip import outputs

        return outputs.to_supervision(self.labels, self.probs, self.class_names)
