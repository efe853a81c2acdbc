"""The public segmentation API: :class:`Segmenter` (``predict``, ``predict_from_features``, text features).

``Segmenter(clip_model, tokenizer)`` wraps any open_clip CLIP ViT (or, for feature-level use such as the
fixture replay, a bare open_clip ``VisionTransformer`` with ``tokenizer=None``). ``predict(image | [images],
classes | preset=...)`` runs the full NACLIP pipeline (:mod:`naclip.inference`): load/convert the image
(:func:`naclip.io.load_image`), resize, normalise, dense cosine logits in ``whole``, ``slide`` or ``single``
mode, resize to the original size, PAMR, ``softmax(40·logits)``, max over synonyms, ``prob_thd`` background,
and returns a :class:`naclip.result.SegmentationResult` (a list for a list) at the original resolution.

Settings: the :class:`naclip.config.SegmentConfig` of the ``Segmenter`` (the one home of the defaults), then
the preset, then ``predict``'s arguments, merged by :meth:`SegmentConfig.resolve`. Arguments are validated
here, once; the internal steps trust them. ``SegmentConfig``, ``SegmentationResult`` and the dtype parser
(:mod:`naclip.precision`) are re-exported from this module.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from naclip import inference, io
from naclip._validate import check_bool, check_int
from naclip.config import SegmentConfig
from naclip.precision import DTYPES, dtype_name, place, resolve_dtype
from naclip.presets import Preset, get_preset
from naclip.result import SegmentationResult
from naclip.text import (
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

#: the library defaults (their one home is :class:`SegmentConfig`) used in the signatures below
_DEFAULTS = SegmentConfig()

__all__ = [
    "DTYPES",
    "SegmentConfig",
    "SegmentationResult",
    "Segmenter",
    "check_input_size",
    "dtype_name",
    "resolve_dtype",
]


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


def _image_tower(clip_model: Any) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """``(visual, clip_model or None)`` for a full open_clip CLIP or its bare ViT image tower; TypeError
    for anything else."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(clip_model, torch.nn.Module):
        raise TypeError(f"clip_model: expected an open_clip CLIP model, got {type(clip_model).__name__}")
    if isinstance(clip_model, VisionTransformer):
        return clip_model, None
    visual = getattr(clip_model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            "clip_model: expected an open_clip CLIP with a ViT image tower (model.visual an "
            f"open_clip VisionTransformer), got {type(clip_model).__name__} "
            f"with visual={type(visual).__name__}"
        )
    if not callable(getattr(clip_model, "encode_text", None)):
        raise TypeError(f"clip_model: {type(clip_model).__name__} has no encode_text method")
    return visual, clip_model


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
        from naclip.methods import METHODS, build_visual, method_config

        visual, self.clip_model = _image_tower(clip_model)
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
        probs_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        keep_probs: bool | None = None,
    ) -> SegmentationResult | list[SegmentationResult]:
        """Segment ``image`` into ``classes`` (or the ``preset``'s classes).

        ``image``: path, PIL image, numpy array or tensor (see :func:`naclip.io.load_image`), or a ``list``
        of them: then a list of results (one per image, in order, each equal to a single call; the text
        features are computed once). ``classes``: ``"sky, cloud; tree; person"`` or ``["sky, cloud",
        "tree", "person"]`` (``";"`` separates classes, commas synonyms). ``preset``: one of
        :data:`naclip.presets.PRESET_NAMES`; it supplies the classes (unless ``classes`` is given),
        ``mode``, ``prob_thd``, ``short_side``/``long_side`` and PAMR on. Other arguments override (``None``
        = preset or :class:`SegmentConfig` default; merged by :meth:`SegmentConfig.resolve`). Returns
        labels/probs at the original size. ``mode="single"`` runs at native resolution (rounded to the patch
        grid) unless ``short_side`` / ``long_side`` are passed here (preset and config sizes do not apply).
        ``probs_path``: stream the probabilities to this ``.npy`` (atomically, tile by tile, never the input
        file; for a list of images a list of paths, one per image); ``keep_probs``: keep them in the result
        (``None``: when they fit ``memory_budget``).
        """
        pre = self._preset(preset)
        spec = self._resolve_classes(classes, pre)
        cfg = self.config.resolve(
            pre, mode=mode, pamr=pamr, prob_thd=prob_thd, short_side=short_side, long_side=long_side,
            crop=crop, stride=stride,
        )  # fmt: skip
        sides = (short_side, long_side) if cfg.mode == "single" else (cfg.short_side, cfg.long_side)
        check_bool("keep_probs", keep_probs, allow_none=True)
        images, paths = _as_batch(image, probs_path)
        self._configure_method(pre)
        feats, qidx, _ = self.text_features(spec, progress=progress)
        run = _Run(spec=spec, preset=pre, cfg=cfg, sides=sides, feats=feats, qidx=qidx.to(self.device))
        results = [
            self._predict_one(img, run, return_logits=return_logits, probs_path=path, keep_probs=keep_probs)
            for img, path in zip(images, paths, strict=True)
        ]
        return results if isinstance(image, list) else results[0]

    def _preset(self, preset: str | Preset | None) -> Preset | None:
        """The preset (by name or as given) as this Segmenter's method runs it."""
        from naclip.methods import method_preset

        pre = get_preset(preset) if isinstance(preset, str) else preset
        if pre is not None and not isinstance(pre, Preset):
            raise TypeError(f"preset: expected a preset name or Preset, got {type(preset).__name__}")
        return method_preset(self.method, pre) if pre is not None else None

    def _configure_method(self, pre: Preset | None) -> None:
        """The preset's per-dataset method parameters, explicit ones winning."""
        if self._default_params:
            preset_params = dict(pre.params) if pre is not None else {}
            self.visual.configure(**{**self._default_params, **preset_params, **self._explicit_params})

    def _predict_one(
        self, image: Any, run: _Run, *, return_logits: bool, probs_path: Any, keep_probs: bool | None
    ) -> SegmentationResult:
        cfg = run.cfg
        source = Path(image) if isinstance(image, str | os.PathLike) else None
        rgb = io.load_image(image, max_pixels=cfg.max_pixels, exif_orientation=cfg.exif_orientation)
        h, w = rgb.shape[:2]
        nh, nw = check_input_size(
            h, w, patch=self.visual.patch_size, short_side=run.sides[0], long_side=run.sides[1],
            max_pixels=cfg.max_pixels, mode=cfg.mode, single_max_pixels=cfg.single_max_pixels,
        )  # fmt: skip
        below_label, has_background = _below_thd_label(run.spec, run.preset)
        x = inference.resize_normalize(rgb, (nh, nw), device=self.device)
        result = self._run(
            x, run.feats, run.qidx, ori_shape=(h, w), cfg=cfg, num_classes=run.spec.num_classes,
            names=list(run.spec.names), below_thd_label=below_label, return_logits=return_logits,
            probs_path=probs_path, keep_probs=keep_probs, protect=[source] if source is not None else [],
        )  # fmt: skip
        result.image, result.source = rgb, source
        result.palette = io.label_palette(background=has_background)
        result.settings = {
            "model": self.model_id, "method": self.visual.strategy, "dtype": dtype_name(self.dtype),
            "gaussian_std": self.visual.gaussian_std,
            "preset": run.preset.name if run.preset is not None else None, "mode": cfg.mode,
            "pamr": cfg.pamr, "prob_thd": cfg.prob_thd, "short_side": run.sides[0], "long_side": run.sides[1],
            "crop": cfg.crop, "stride": cfg.stride, "logit_scale": cfg.logit_scale,
            "templates": len(cfg.templates), "below_thd_label": below_label,
        }  # fmt: skip
        return result

    def predict_from_features(
        self,
        image: torch.Tensor,
        query_features: torch.Tensor,
        query_idx: torch.Tensor | Sequence[int],
        *,
        ori_shape: tuple[int, int] | None = None,
        mode: str = _DEFAULTS.mode,
        pamr_steps: int = _DEFAULTS.pamr_steps,
        pamr_dilations: Sequence[int] = _DEFAULTS.pamr_dilations,
        prob_thd: float = _DEFAULTS.prob_thd,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        crop: int = _DEFAULTS.crop,
        stride: int = _DEFAULTS.stride,
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

        The defaults are those of :class:`SegmentConfig` (not of this Segmenter's config, except
        ``logit_scale`` and ``memory_budget``).
        """
        inference.check_model_input(image)
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
        shape = (int(image.shape[2]), int(image.shape[3])) if ori_shape is None else ori_shape
        shape = inference.check_shape("ori_shape", shape)
        cfg = self.config.resolve(
            mode=mode, pamr=True, pamr_steps=pamr_steps,
            pamr_dilations=tuple(pamr_dilations), prob_thd=prob_thd, crop=crop, stride=stride,
            logit_scale=logit_scale,
        )  # fmt: skip
        cfg = dataclasses.replace(cfg, area_thd=area_thd)
        qidx, n_cls = inference.check_query_idx(query_idx, query_features.shape[0], self.device, num_classes)
        names = [f"class_{i}" for i in range(n_cls)] if class_names is None else [str(n) for n in class_names]
        if len(names) != n_cls:
            raise ValueError(f"class_names: expected {n_cls} names, got {len(names)}")
        check_int("below_thd_label", below_thd_label, minimum=0)
        check_bool("keep_probs", keep_probs, allow_none=True)
        return self._run(
            image.to(self.device), query_features, qidx, ori_shape=shape, cfg=cfg, num_classes=n_cls,
            names=names, below_thd_label=below_thd_label, return_logits=return_logits, probs_path=probs_path,
            keep_probs=keep_probs, protect=protect,
        )  # fmt: skip

    @torch.inference_mode()
    def _run(
        self, x: torch.Tensor, feats: torch.Tensor, qidx: torch.Tensor, *, ori_shape: tuple[int, int],
        cfg: SegmentConfig, num_classes: int, names: list[str], below_thd_label: int, return_logits: bool,
        probs_path: Any, keep_probs: bool | None, protect: Iterable[os.PathLike | str],
    ) -> SegmentationResult:  # fmt: skip
        """The pipeline on checked inputs: logits (:func:`naclip.inference.run_logits`), then
        post-processing (:func:`naclip.inference.run_postprocess`), streamed to ``probs_path`` if given."""
        inference.check_crop(cfg.mode, cfg.crop, tuple(x.shape[-2:]), self.visual.patch_size)
        logits = inference.run_logits(
            self.visual, x, feats, mode=cfg.mode, crop=cfg.crop, stride=cfg.stride,
            memory_budget=cfg.memory_budget, pad_crops=self.style.pad_crops,
            whole_size=ori_shape if self.style.whole_to_output else None,
        )  # fmt: skip
        oh, ow = ori_shape
        post = inference.PostSettings(
            query_idx=qidx.to(logits.device), ori_shape=(oh, ow), num_classes=num_classes,
            pamr_steps=cfg.pamr_steps if cfg.pamr else 0, pamr_dilations=tuple(cfg.pamr_dilations),
            prob_thd=cfg.prob_thd, logit_scale=float(cfg.logit_scale), below_thd_label=below_thd_label,
            area_thd=cfg.area_thd, renormalize=self.style.renormalize, memory_budget=cfg.memory_budget,
            keep_probs=4 * num_classes * oh * ow <= cfg.memory_budget if keep_probs is None else keep_probs,
        )  # fmt: skip
        if probs_path is None:
            labels, probs = inference.run_postprocess(logits, x, post)
        else:
            out: list = []

            def fill(sink):
                out.extend(inference.run_postprocess(logits, x, post, probs_sink=sink))

            io.save_probs_streaming(probs_path, (num_classes, oh, ow), fill, protect=protect)
            labels, probs = out
        return SegmentationResult(
            labels=labels, probs=probs, class_names=names, logits=logits[0].cpu() if return_logits else None
        )


@dataclass(frozen=True)
class _Run:
    """What :meth:`Segmenter.predict` resolved once for all its images."""

    spec: ClassSpec
    preset: Preset | None
    cfg: SegmentConfig
    sides: tuple[int | None, int | None]
    feats: torch.Tensor
    qidx: torch.Tensor


def _as_batch(image: Any, probs_path: Any) -> tuple[list[Any], list[Any]]:
    """``(images, probs paths)``: a list of images as given (non-empty), one image as a list of one; a
    list's ``probs_path`` must be ``None`` or one path per image."""
    if not isinstance(image, list):
        return [image], [probs_path]
    if not image:
        raise ValueError("image: expected an image or a non-empty list of images, got []")
    if probs_path is None:
        return image, [None] * len(image)
    if not isinstance(probs_path, list | tuple) or len(probs_path) != len(image):
        raise ValueError(
            f"probs_path: expected one path per image ({len(image)}) for a list of images, got {probs_path!r}"
        )
    return image, list(probs_path)
