"""The library settings: :class:`SegmentConfig` (the one home of the defaults) and their one merge.

``SegmentConfig()`` holds the defaults; :meth:`SegmentConfig.resolve` merges a preset's values and then the
user's overrides into a new, validated config (the only place settings are merged: ``Segmenter.predict``,
the evaluator). Also the pipeline constants :data:`MODES`, :data:`LOGIT_SCALE`,
:data:`DEFAULT_MEMORY_BUDGET` (re-exported by :mod:`naclip.inference`), :data:`DEFAULT_MAX_PIXELS`
(re-exported by :mod:`naclip.io`). Imports no writer (only the text templates).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from naclip._validate import check_bool, check_choice, check_int, check_ints, check_number, check_probability
from naclip.text import TEMPLATES

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MEMORY_BUDGET",
    "LOGIT_SCALE",
    "MODES",
    "PRESET_KEYS",
    "SegmentConfig",
]

#: NACLIP's softmax temperature (``softmax(40 · cos)``), not CLIP's 100.
LOGIT_SCALE = 40.0
MODES = ("whole", "slide", "single")
#: Default working-memory budget in bytes (crop batches of ``slide``, post-processing tiles): 2 GiB.
DEFAULT_MEMORY_BUDGET = 2 << 30
#: Default pixel limit (H·W) of an input image: 64 megapixels (e.g. 8000 x 8000).
DEFAULT_MAX_PIXELS = 64_000_000
#: the :class:`naclip.presets.Preset` fields that set a :class:`SegmentConfig` field of the same name
PRESET_KEYS = (
    "mode",
    "pamr",
    "prob_thd",
    "short_side",
    "long_side",
    "crop",
    "stride",
    "logit_scale",
    "area_thd",
)


@dataclass(frozen=True)
class SegmentConfig:
    """Library defaults (used when neither ``predict``'s arguments nor a preset set a value): the one
    home of every default of the pipeline (the signatures of :mod:`naclip.inference` read them from here).

    Attributes:
        mode: ``"whole"`` (resized image in one pass), ``"slide"`` (crop/stride windows, averaged) or
            ``"single"`` (native resolution rounded to the patch grid, one pass; see
            :func:`naclip.inference.model_input_size`).
        short_side, long_side: resize ``scale=(long_side, short_side)`` (mmcv ``imrescale``) for ``whole`` /
            ``slide``; ``short_side=None`` keeps the original resolution. ``single`` ignores these defaults
            (native) and only rescales with the sides passed to ``predict``.
        crop, stride: sliding-window size and step in pixels of the resized image.
        pamr: PAMR refinement on/off (official default on); ``pamr_steps`` iterations, ``pamr_dilations``.
        prob_thd: pixels whose best class probability is below it become class 0.
        logit_scale: softmax temperature (40 in NACLIP).
        gaussian_std: std of NACLIP's Gaussian attention bias in patch units (5 in NACLIP; the default of
            :class:`Segmenter`'s ``gaussian_std``).
        area_thd: SCLIP's area filter (``None`` = off; :func:`naclip.inference.postprocess`).
        max_pixels: limit on ``H·W`` of the input image and of the resized model input (``None``: no limit).
        exif_orientation: turn image files upright by their EXIF Orientation tag (see
            :func:`naclip.io.load_image`); ``False`` keeps the pixels as stored.
        memory_budget: bytes of working memory for a batch of sliding-window crops (sets the crop batch size)
            and for one post-processing tile (sets the tile size; the result does not depend on it). Also
            the limit up to which ``probs`` are kept in the result (``4·C·H·W`` bytes).
        single_max_pixels: limit on ``h·w`` of the ``single`` mode's model input (``None``: no limit); a
            larger input is a :class:`naclip.io.ImageTooLargeError` naming ``short_side`` / ``long_side``.
        text_batch: queries per ``encode_text`` call (each query has ``len(templates)`` prompts).
        templates: prompt templates with a ``{c}`` placeholder; default the 80 OpenAI ImageNet templates
            (:data:`naclip.text.TEMPLATES`, as NACLIP). Fewer templates encode faster but change the features.
    """

    mode: str = "whole"
    short_side: int | None = 336
    long_side: int = 2048
    crop: int = 224
    stride: int = 112
    pamr: bool = True
    pamr_steps: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    prob_thd: float = 0.0
    logit_scale: float = LOGIT_SCALE
    gaussian_std: float = 5.0
    area_thd: float | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    exif_orientation: bool = True
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    single_max_pixels: int | None = 4096 * 4096
    text_batch: int = 8
    templates: tuple[str, ...] = TEMPLATES

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        for name in ("long_side", "crop", "stride", "memory_budget", "text_batch"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("short_side", "max_pixels", "single_max_pixels"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_int("pamr_steps", self.pamr_steps, minimum=0)
        check_bool("pamr", self.pamr)
        check_bool("exif_orientation", self.exif_orientation)
        check_ints("pamr_dilations", self.pamr_dilations)
        check_probability("prob_thd", self.prob_thd)
        if self.area_thd is not None:
            check_probability("area_thd", self.area_thd)
        try:
            check_number("gaussian_std", self.gaussian_std, positive=True)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        check_number("logit_scale", self.logit_scale)
        if (
            isinstance(self.templates, str)
            or not self.templates
            or not all(isinstance(t, str) and "{c}" in t for t in self.templates)
        ):
            raise ValueError(
                f"templates: expected a non-empty tuple of str containing '{{c}}', got {self.templates!r}"
            )

    def resolve(self, preset: Any = None, /, **overrides: Any) -> SegmentConfig:
        """THE merge of settings: this config, then the ``preset``'s values (a
        :class:`naclip.presets.Preset`; ``mode``, ``pamr``, ``prob_thd``, ``short_side``, ``long_side``
        always, ``crop`` / ``stride`` / ``logit_scale`` / ``area_thd`` when the preset sets them), then the
        ``overrides`` that are not ``None`` (``None`` = not given). Returns a new validated config.

        ``TypeError`` naming them for keys that are not fields; the values are validated like the
        constructor's (``TypeError`` / ``ValueError`` naming the field).
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"SegmentConfig.resolve: unknown setting(s) {unknown}; expected some of {sorted(fields)}"
            )
        values: dict[str, Any] = {}
        if preset is not None:
            for key in PRESET_KEYS:
                value = getattr(preset, key, None)
                if value is not None:
                    values[key] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        return dataclasses.replace(self, **values) if values else self
