"""The public segmentation API: :class:`Segmenter`, :class:`SegmentationResult`, :class:`SegmentConfig`.

``Segmenter(clip_model, tokenizer)`` wraps any open_clip CLIP ViT (or, for feature-level use such as the
fixture replay, a bare open_clip ``VisionTransformer`` with ``tokenizer=None``). ``predict(image, classes |
preset=...)`` runs the full NACLIP pipeline (see :mod:`naclip.inference`): load/convert the image
(:func:`naclip.io.load_image`), resize (short side 336 by default), normalise, dense cosine logits in
``whole``, ``slide`` or ``single`` mode, resize to the original size, PAMR, ``softmax(40·logits)``, max over
synonyms, ``prob_thd`` background, and returns a :class:`SegmentationResult` at the original resolution.

Settings come from, in order of precedence: the keyword arguments of ``predict``, the preset (if any), then
the :class:`SegmentConfig` given to the ``Segmenter`` (defaults below; the single home of the library
defaults).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naclip import inference, io
from naclip.precision import DTYPES, dtype_name, place, resolve_dtype
from naclip.presets import Preset, get_preset
from naclip.text import (
    TEMPLATES,
    ClassSpec,
    TextFeatureCache,
    encode_queries,
    parse_classes,
    text_encoding_path,
)
from naclip.text_cache import (
    DiskTextCache,
    TextCacheContext,
    cache_root,
    encode_queries_cached,
    tokenizer_digest,
    weights_digest,
)

__all__ = [
    "DTYPES",
    "SegmentConfig",
    "SegmentationResult",
    "Segmenter",
    "check_input_size",
    "dtype_name",
    "resolve_dtype",
]

def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SegmentConfig:
    """Library defaults (used when neither ``predict``'s arguments nor a preset set a value).

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
    logit_scale: float = inference.LOGIT_SCALE
    gaussian_std: float = 5.0
    area_thd: float | None = None
    max_pixels: int | None = io.DEFAULT_MAX_PIXELS
    exif_orientation: bool = True
    memory_budget: int = inference.DEFAULT_MEMORY_BUDGET
    single_max_pixels: int | None = 4096 * 4096
    text_batch: int = 8
    templates: tuple[str, ...] = TEMPLATES

    def __post_init__(self) -> None:
        if self.mode not in inference.MODES:
            raise ValueError(f"mode: expected one of {inference.MODES}, got {self.mode!r}")
        if self.short_side is not None:
            _check_int("short_side", self.short_side, 1)
        _check_int("long_side", self.long_side, 1)
        _check_int("crop", self.crop, 1)
        _check_int("stride", self.stride, 1)
        _check_int("pamr_steps", self.pamr_steps, 0)
        if not isinstance(self.pamr, bool):
            raise TypeError(f"pamr: expected a bool, got {self.pamr!r}")
        if not isinstance(self.exif_orientation, bool):
            raise TypeError(f"exif_orientation: expected a bool, got {self.exif_orientation!r}")
        if not self.pamr_dilations or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.pamr_dilations
        ):
            raise ValueError(f"pamr_dilations: expected positive ints, got {self.pamr_dilations!r}")
        _check_prob_thd(self.prob_thd)
        if self.area_thd is not None:
            inference._check_probability("area_thd", self.area_thd)
        if self.max_pixels is not None:
            _check_int("max_pixels", self.max_pixels, 1)
        _check_int("memory_budget", self.memory_budget, 1)
        if self.single_max_pixels is not None:
            _check_int("single_max_pixels", self.single_max_pixels, 1)
        _check_int("text_batch", self.text_batch, 1)
        std = self.gaussian_std
        if isinstance(std, bool) or not isinstance(std, int | float) or not 0 < std < float("inf"):
            raise ValueError(f"gaussian_std: expected a finite number > 0, got {std!r}")
        if (
            isinstance(self.templates, str)
            or not self.templates
            or not all(isinstance(t, str) and "{c}" in t for t in self.templates)
        ):
            raise ValueError(
                f"templates: expected a non-empty tuple of str containing '{{c}}', got {self.templates!r}"
            )


def _check_prob_thd(value: Any) -> float:
    return inference._check_probability("prob_thd", value)


def check_input_size(
    height: int,
    width: int,
    *,
    patch: tuple[int, int] | None,
    short_side: int | None,
    long_side: int | None,
    max_pixels: int | None,
    mode: str = "whole",
    single_max_pixels: int | None = None,
) -> tuple[int, int]:
    """The size checks of :meth:`Segmenter.predict` on an ``height x width`` image, runnable before any
    model exists (the CLI runs them on every input first): at least one ``patch`` (``None``: unknown,
    skipped), the model input (:func:`naclip.inference.model_input_size` for ``mode``) too, within
    ``max_pixels`` and, in ``single`` mode, ``single_max_pixels``. Returns the model input size ``(h, w)``.
    ``ValueError`` / :class:`naclip.io.ImageTooLargeError` naming the sizes otherwise."""
    ph, pw = patch if patch is not None else (1, 1)
    if height < ph or width < pw:
        raise ValueError(f"image: {height}x{width} is smaller than one {ph}x{pw} patch of the model")
    grid = patch if patch is not None else (1, 1)
    nh, nw = inference.model_input_size(
        height, width, mode=mode, patch_size=grid, short_side=short_side, long_side=long_side
    )
    if (nh, nw) == (height, width) and mode != "single":
        return nh, nw
    if nh < ph or nw < pw:
        raise ValueError(
            f"image: {height}x{width} resized to {nh}x{nw} (short side {short_side}, long side {long_side}) "
            f"is smaller than one {ph}x{pw} patch; the aspect ratio is too extreme"
        )
    if max_pixels is not None and nh * nw > max_pixels:
        raise io.ImageTooLargeError(
            f"image: the resized model input {nw}x{nh} has {nh * nw:,} pixels, above the limit of "
            f"{max_pixels:,} (lower short_side or raise SegmentConfig.max_pixels)"
        )
    if mode == "single" and single_max_pixels is not None and nh * nw > single_max_pixels:
        raise io.ImageTooLargeError(
            f"image: single mode's model input {nw}x{nh} has {nh * nw:,} pixels, above the limit of "
            f"{single_max_pixels:,} (pass long_side / short_side, e.g. --long-side 2048, to "
            "downscale, or raise SegmentConfig.single_max_pixels)"
        )
    return nh, nw


def _below_thd_label(spec: ClassSpec, preset: Preset | None) -> tuple[int, bool]:
    """``(label of pixels below prob_thd, palette has a background)``: a preset's class 0 (its real
    background, the benchmark semantics); else the first user class with a ``background`` synonym; else
    :data:`naclip.io.UNKNOWN_LABEL` ("unknown"; ``num_classes`` beyond 255 classes, which no palette PNG
    holds anyway)."""
    if preset is not None:
        return 0, True
    for c, synonyms in enumerate(spec.synonyms):
        if any(s.strip().lower() == "background" for s in synonyms):
            return c, False
    return max(io.UNKNOWN_LABEL, spec.num_classes), False


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


def _disk_cache(text_cache: str | os.PathLike | bool | None) -> DiskTextCache | None:
    if text_cache is None or text_cache is True:
        root = cache_root()
        return None if root is None else DiskTextCache(root)
    if text_cache is False:
        return None
    if isinstance(text_cache, str | os.PathLike) and os.fspath(text_cache).strip():
        return DiskTextCache(text_cache)
    raise TypeError(f"text_cache: expected None, a bool or a folder path, got {text_cache!r}")


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class Segmenter:
    """NACLIP open-vocabulary semantic segmentation on an open_clip CLIP ViT.

    Args:
        clip_model: an open_clip ``CLIP`` with a ViT image tower (``.visual`` an open_clip
            ``VisionTransformer``, ``.encode_text``), or a bare ``VisionTransformer`` (then only
            :meth:`predict_from_features` works). Moved in place to ``device`` / ``dtype`` when given.
        tokenizer: the open_clip tokenizer of the model (``open_clip.get_tokenizer(name)``), or ``None`` for a
            bare image tower.
        method: a method of :data:`naclip.methods.METHODS` (``naclip``, ``clearclip``, ``sclip``,
            ``resclip``, ``scclip``) or an ablation strategy of :data:`naclip.strategies.STRATEGIES` (``kk``,
            ``nonly``, ``vanilla``, ``csa``, ``qq``: NACLIP's pipeline with that last-block attention).
        arch: last-block architecture ``"reduced"`` or ``"vanilla"``; ``None`` picks the method's (SCLIP /
            ``csa`` -> ``vanilla``, else ``reduced``).
        gaussian_std: Gaussian std in patch units (``naclip``/``nonly``/``resclip``); ``None``:
            ``config.gaussian_std``.
        method_params: the method's parameters (:attr:`naclip.methods.Method.params`, e.g. ResCLIP's
            ``rcs=False`` or ``rcs_layers``); they win over a preset's per-dataset values.
        backend: ``naclip_kernels`` backend (``None`` = global default: Triton on CUDA, PyTorch on CPU).
        device, dtype: where/how to run; the model is moved in place. ``dtype`` (anything
            :func:`resolve_dtype` takes: ``"fp32"``, ``"fp16"``, ``"bf16"``, a torch dtype) applies
            open_clip's mixed precision like ``from_pretrained``: linear/conv weights in ``dtype``,
            LayerNorm in fp32 (spec §1.5); ``None`` keeps the model's precision.
        config: :class:`SegmentConfig` with the defaults; ``None`` = the method's official segmentor
            defaults (:attr:`naclip.methods.Method.config`, e.g. ClearCLIP's logit scale 50, crop 448).
        model_id: a name for the in-memory text-feature cache key (default: derived from the object).
        text_cache: persistent text-feature cache (:mod:`naclip.text_cache`): ``None`` = the default folder
            (``$NACLIP_CACHE_DIR``, off when that is set to ""; else ``~/.cache/naclip``), a path = that
            folder, ``False`` = off. Keyed by the text weights' hash, templates, dtype, ...: a hit gives the
            same features as encoding.
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        *,
        method: str = "naclip",
        arch: str | None = None,
        gaussian_std: float | None = None,
        method_params: dict[str, Any] | None = None,
        backend: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        config: SegmentConfig | None = None,
        model_id: str | None = None,
        text_cache: str | os.PathLike | bool | None = None,
    ) -> None:
        from open_clip.transformer import VisionTransformer

        from naclip.methods import METHODS, build_visual, method_config

        if not isinstance(clip_model, torch.nn.Module):
            raise TypeError(f"clip_model: expected an open_clip CLIP model, got {type(clip_model).__name__}")
        if isinstance(clip_model, VisionTransformer):
            visual, self.clip_model = clip_model, None
        else:
            visual = getattr(clip_model, "visual", None)
            if not isinstance(visual, VisionTransformer):
                raise TypeError(
                    "clip_model: expected an open_clip CLIP with a ViT image tower (model.visual an "
                    f"open_clip VisionTransformer), got {type(clip_model).__name__} "
                    f"with visual={type(visual).__name__}"
                )
            if not callable(getattr(clip_model, "encode_text", None)):
                raise TypeError(f"clip_model: {type(clip_model).__name__} has no encode_text method")
            self.clip_model = clip_model
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(
                f"tokenizer: expected a callable open_clip tokenizer, got {type(tokenizer).__name__}"
            )
        spec = METHODS.get(method, METHODS["naclip"])
        if config is None:
            config = SegmentConfig(**method_config(method))
        elif not isinstance(config, SegmentConfig):
            raise TypeError(f"config: expected a SegmentConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = tokenizer
        torch_dtype = resolve_dtype(dtype)
        module = self.clip_model if self.clip_model is not None else visual
        place(module, device, torch_dtype)
        module.eval()
        self.visual = build_visual(
            method,
            visual,
            arch=arch,
            gaussian_std=config.gaussian_std if gaussian_std is None else gaussian_std,
            backend=backend,
            params=method_params,
        )
        self.method, self.style = method, spec.style
        self._explicit_params = dict(method_params or {})
        self._default_params = {k: getattr(self.visual, k) for k in spec.params}
        self.model_id = model_id or f"{type(module).__name__}@{id(module):x}"
        self._text_cache = TextFeatureCache()
        self._disk_cache = _disk_cache(text_cache)
        self._text_model_name = model_id or type(module).__name__  # disk-cache key (with the weights' hash)
        self._text_ctx: dict[tuple, TextCacheContext] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str = "ViT-B-16",
        pretrained: str | None = "openai",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        method: str = "naclip",
        checkpoint: str | os.PathLike | None = None,
        **kw: Any,
    ) -> Segmenter:
        """Load an open_clip model with :func:`naclip.hub.load_clip` (downloads into the standard cache; a
        clear ``WeightsUnavailableError`` when offline) and wrap it. ``pretrained=None`` gives random weights;
        ``checkpoint`` a local weights file. ``kw`` go to :class:`Segmenter` (``arch``, ``gaussian_std``,
        ``method_params``, ``backend``, ``config``)."""
        from naclip.hub import load_clip

        torch_dtype = resolve_dtype(dtype)
        clip_model, tokenizer = load_clip(
            model, pretrained, device=device, dtype=torch_dtype, checkpoint=checkpoint
        )
        tag = str(checkpoint) if checkpoint is not None else str(pretrained)
        kw.setdefault("model_id", f"{model}/{tag}")
        # load_clip already placed the model and applied open_clip's mixed precision (LayerNorm kept in fp32).
        seg = cls(clip_model, tokenizer, method=method, **kw)
        seg._text_model_name = model  # the weights' hash identifies the file, not its path
        return seg

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return _device_of(self.visual)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the image tower's patch embedding (the dtype images are cast to)."""
        return self.visual.visual.conv1.weight.dtype

    def __repr__(self) -> str:
        return (
            f"Segmenter(model_id={self.model_id!r}, method={self.method!r}, "
            f"arch={self.visual.arch!r}, "
            f"gaussian_std={self.visual.gaussian_std!r}, device={str(self.device)!r}, dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ text
    def _resolve_classes(self, classes: Any, preset: Preset | None) -> ClassSpec:
        if classes is None:
            if preset is None:
                raise ValueError(
                    "classes: expected class names (e.g. 'sky, cloud; tree; person') or a preset"
                )
            return preset.classes
        return parse_classes(classes)

    def text_features(
        self,
        classes: str | Sequence[str] | ClassSpec,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Text classifier of ``classes``: ``(features [Q, D] unit rows, query_to_class LongTensor [Q],
        class_names)``; features are float32 on the model's device. Cached in memory per (model, dtype,
        device, templates, queries) and, per query, on disk (``text_cache``); ``progress(done, total)`` is
        called while the queries missing from both caches are encoded (``total`` = their number).
        """
        spec = parse_classes(classes)
        if self.clip_model is None or self.tokenizer is None:
            raise ValueError(
                "classes: this Segmenter has no text encoder/tokenizer (built from an image tower only); "
                "use predict_from_features with precomputed query features"
            )
        templates = tuple(self.config.templates)
        key = (self.model_id, str(self.dtype), str(self.device), templates, spec.queries)

        def encode(queries: list[str], report: Callable[[int, int], None] | None) -> torch.Tensor:
            return encode_queries(
                self.clip_model,
                self.tokenizer,
                queries,
                templates=templates,
                queries_per_batch=self.config.text_batch,
                progress=report,
            )

        def compute() -> torch.Tensor:
            if self._disk_cache is None:
                return encode(list(spec.queries), progress)
            ctx = self._text_context(templates)
            return encode_queries_cached(self._disk_cache, ctx, encode, spec.queries, progress=progress)

        feats = self._text_cache.get_or_compute(key, compute)
        qidx = torch.tensor(spec.query_to_class, dtype=torch.long)
        return feats.to(self.device), qidx, list(spec.names)

    def _text_context(self, templates: tuple[str, ...]) -> TextCacheContext:
        """Disk-cache key of this model's text features (the weights are hashed once per Segmenter)."""
        if templates not in self._text_ctx:
            import open_clip

            base = next(iter(self._text_ctx.values()), None)
            self._text_ctx[templates] = TextCacheContext(
                model=self._text_model_name,
                weights_sha256=base.weights_sha256 if base else weights_digest(self.clip_model),
                tokenizer_sha256=base.tokenizer_sha256 if base else tokenizer_digest(self.tokenizer),
                templates=templates,
                dtype=dtype_name(self.dtype),
                device_type=self.device.type,
                open_clip=open_clip.__version__,
                encoding_path=text_encoding_path(self.clip_model)[0],
            )
        return self._text_ctx[templates]

    # ------------------------------------------------------------------ inference
    def predict(
        self,
        image: Any,
        classes: str | Sequence[str] | ClassSpec | None = None,
        *,
        preset: str | Preset | None = None,
        mode: str | None = None,
        pamr: bool | None = None,
        prob_thd: float | None = None,
        short_side: int | None = None,
        long_side: int | None = None,
        crop: int | None = None,
        stride: int | None = None,
        return_logits: bool = False,
        progress: Callable[[int, int], None] | None = None,
        probs_path: str | os.PathLike | None = None,
        keep_probs: bool | None = None,
    ) -> SegmentationResult:
        """Segment ``image`` into ``classes`` (or the ``preset``'s classes).

        ``image``: path, PIL image, numpy array or tensor (see :func:`naclip.io.load_image`). ``classes``:
        ``"sky, cloud; tree; person"`` or ``["sky, cloud", "tree", "person"]`` (``";"`` separates classes,
        commas synonyms). ``preset``: one of :data:`naclip.presets.PRESET_NAMES`; it supplies the classes
        (unless ``classes`` is given), ``mode``, ``prob_thd``, ``short_side``/``long_side`` and PAMR on. Other
        arguments override (``None`` = preset or :class:`SegmentConfig` default). Returns labels/probs at the
        original size. ``mode="single"`` runs at native resolution (rounded to the patch grid) unless
        ``short_side`` / ``long_side`` are passed here (preset and config sizes do not apply).
        ``probs_path``: stream the probabilities to this ``.npy`` (atomically, tile by tile, never the input
        file); ``keep_probs``: keep them in the result (``None``: when they fit ``memory_budget``).
        """
        from naclip.methods import method_preset

        cfg = self.config
        pre = get_preset(preset) if isinstance(preset, str) else preset
        if pre is not None and not isinstance(pre, Preset):
            raise TypeError(f"preset: expected a preset name or Preset, got {type(preset).__name__}")
        if pre is not None:
            pre = method_preset(self.method, pre)
        spec = self._resolve_classes(classes, pre)
        mode = mode if mode is not None else (pre.mode if pre is not None else cfg.mode)
        if mode not in inference.MODES:
            raise ValueError(f"mode: expected one of {inference.MODES}, got {mode!r}")
        use_pamr = pamr if pamr is not None else (pre.pamr if pre is not None else cfg.pamr)
        if not isinstance(use_pamr, bool):
            raise TypeError(f"pamr: expected a bool or None, got {pamr!r}")
        thd = _check_prob_thd(
            prob_thd if prob_thd is not None else (pre.prob_thd if pre is not None else cfg.prob_thd)
        )
        if short_side is not None:
            _check_int("short_side", short_side, 1)
        elif mode != "single":
            short_side = pre.short_side if pre is not None else cfg.short_side
        if long_side is not None:
            _check_int("long_side", long_side, 1)
        elif mode != "single":
            long_side = pre.long_side if pre is not None else cfg.long_side
        crop = crop if crop is not None else (pre.crop if pre is not None and pre.crop else cfg.crop)
        stride = (
            stride if stride is not None else (pre.stride if pre is not None and pre.stride else cfg.stride)
        )
        scale = pre.logit_scale if pre is not None and pre.logit_scale is not None else cfg.logit_scale
        area_thd = pre.area_thd if pre is not None and pre.area_thd is not None else cfg.area_thd
        if self._default_params:  # the preset's per-dataset method parameters, explicit ones winning
            preset_params = dict(pre.params) if pre is not None else {}
            self.visual.configure(**{**self._default_params, **preset_params, **self._explicit_params})
        _check_int("crop", crop, 1)
        _check_int("stride", stride, 1)

        source = Path(image) if isinstance(image, str | os.PathLike) else None
        rgb = io.load_image(image, max_pixels=cfg.max_pixels, exif_orientation=cfg.exif_orientation)
        h, w = rgb.shape[:2]
        nh, nw = check_input_size(
            h, w, patch=self.visual.patch_size, short_side=short_side, long_side=long_side,
            max_pixels=cfg.max_pixels, mode=mode, single_max_pixels=cfg.single_max_pixels,
        )  # fmt: skip
        below_label, has_background = _below_thd_label(spec, pre)
        feats, qidx, _ = self.text_features(spec, progress=progress)
        x = inference.preprocess(rgb, size=(nh, nw), device=self.device)
        protect_paths = [source] if source is not None else []
        result = self.predict_from_features(
            x,
            feats,
            qidx,
            ori_shape=(h, w),
            mode=mode,
            pamr_steps=cfg.pamr_steps if use_pamr else 0,
            pamr_dilations=cfg.pamr_dilations,
            prob_thd=thd,
            num_classes=spec.num_classes,
            class_names=list(spec.names),
            crop=crop,
            stride=stride,
            logit_scale=scale,
            area_thd=area_thd,
            return_logits=return_logits,
            below_thd_label=below_label,
            probs_path=probs_path,
            keep_probs=keep_probs,
            protect=protect_paths,
        )
        result.image = rgb
        result.source = source
        result.palette = io.label_palette(background=has_background)
        result.settings = {
            "model": self.model_id, "method": self.visual.strategy, "dtype": dtype_name(self.dtype),
            "gaussian_std": self.visual.gaussian_std,
            "preset": pre.name if pre is not None else None, "mode": mode, "pamr": use_pamr, "prob_thd": thd,
            "short_side": short_side, "long_side": long_side, "crop": crop, "stride": stride,
            "logit_scale": cfg.logit_scale, "templates": len(cfg.templates), "below_thd_label": below_label,
        }  # fmt: skip
        return result

    @torch.inference_mode()
    def predict_from_features(
        self,
        image: torch.Tensor,
        query_features: torch.Tensor,
        query_idx: torch.Tensor | Sequence[int],
        *,
        ori_shape: tuple[int, int] | None = None,
        mode: str = "whole",
        pamr_steps: int = 10,
        pamr_dilations: Sequence[int] = (8, 16),
        prob_thd: float = 0.0,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        crop: int = 224,
        stride: int = 112,
        logit_scale: float | None = None,
        area_thd: float | None = None,
        return_logits: bool = False,
        below_thd_label: int = 0,
        probs_path: str | os.PathLike | None = None,
        keep_probs: bool | None = None,
        protect: Iterable[os.PathLike | str] = (),
    ) -> SegmentationResult:
        """Run the pipeline from a normalised model input and precomputed query features (the official
        ``NACLIP.predict`` given ``query_features``/``query_idx``).

        Args:
            image: normalised ``[1, 3, H, W]`` float tensor (``(rgb - CLIP_MEAN) / CLIP_STD``), already
                resized.
            query_features: ``[Q, D]`` text features (L2-normalised rows; used as given).
            query_idx: ``[Q]`` class index of every query.
            ori_shape: output size ``(oh, ow)`` (default: ``(H, W)``).
            mode: ``"whole"``, ``"slide"`` or ``"single"``.
            pamr_steps, pamr_dilations: PAMR iterations (0 = off) and dilations.
            prob_thd: background threshold; num_classes: default ``max(query_idx) + 1``.
            class_names: display names (default ``"class_<i>"``).
            crop, stride: sliding window geometry; logit_scale: default ``SegmentConfig.logit_scale`` (40).
            area_thd: SCLIP's area filter (``None`` = off).
            return_logits: keep the raw logits ``[Q, H, W]`` (for slide: the window average) in the result.
            below_thd_label: label of pixels below ``prob_thd`` (default 0, the official background class).
            probs_path, keep_probs: stream the probabilities to a ``.npy`` (never onto a ``protect`` path) /
                keep them in the result (``None``: when ``4·C·oh·ow <= SegmentConfig.memory_budget``).
        """
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or tuple(image.shape[:2]) != (1, 3):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a normalised float tensor [1, 3, H, W], got {shape}")
        if not image.is_floating_point():
            raise TypeError(f"image: expected a normalised floating tensor, got dtype {image.dtype}")
        if not isinstance(query_features, torch.Tensor) or query_features.ndim != 2:
            raise ValueError(
                "query_features: expected a [Q, D] tensor, "
                f"got {getattr(query_features, 'shape', query_features)}"
            )
        if query_features.shape[1] != self.visual.output_dim:
            raise ValueError(
                f"query_features: expected D = {self.visual.output_dim} (the model's output dim), "
                f"got {query_features.shape[1]}"
            )
        if ori_shape is None:
            ori_shape = (int(image.shape[2]), int(image.shape[3]))
        thd = _check_prob_thd(prob_thd)
        scale = self.config.logit_scale if logit_scale is None else float(logit_scale)
        image = image.to(self.device)
        logits = inference.infer_logits(
            self.visual,
            image,
            query_features,
            mode=mode,
            crop=crop,
            stride=stride,
            memory_budget=self.config.memory_budget,
            pad_crops=self.style.pad_crops,
            whole_size=tuple(int(v) for v in ori_shape) if self.style.whole_to_output else None,
        )
        post = {"ori_shape": ori_shape, "num_classes": num_classes, "pamr_steps": pamr_steps}
        post |= {"pamr_dilations": pamr_dilations, "prob_thd": thd, "logit_scale": scale}
        post |= {"memory_budget": self.config.memory_budget, "keep_probs": keep_probs}
        post |= {"below_thd_label": below_thd_label, "area_thd": area_thd}
        post |= {"renormalize": self.style.renormalize}
        if probs_path is None:
            labels, probs = inference.postprocess(logits, image, query_idx, **post)
        else:
            n_out = int(num_classes) if num_classes is not None else int(torch.as_tensor(query_idx).max()) + 1
            shape = (n_out, int(ori_shape[0]), int(ori_shape[1]))
            # validate every argument on a 1x1 output before the .npy is created
            inference.postprocess(logits[:, :, :1, :1], image, query_idx, **(post | {"ori_shape": (1, 1)}))
            out: list = []

            def fill(sink):
                out.extend(inference.postprocess(logits, image, query_idx, probs_sink=sink, **post))

            io.save_probs_streaming(probs_path, shape, fill, protect=protect)
            labels, probs = out
        n_cls = int(num_classes) if num_classes is not None else int(torch.as_tensor(query_idx).max()) + 1
        if class_names is None:
            names = [f"class_{i}" for i in range(n_cls)]
        else:
            names = [str(n) for n in class_names]
            if len(names) != n_cls:
                raise ValueError(f"class_names: expected {n_cls} names, got {len(names)}")
        return SegmentationResult(
            labels=labels,
            probs=probs,
            class_names=names,
            logits=logits[0].cpu() if return_logits else None,
        )
