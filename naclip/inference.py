"""Image preprocessing, dense logits, whole / sliding-window / single-pass inference and post-processing.

Reproduces the official NACLIP pipeline (spec §2.2-§2.5):

* **Preprocessing** (:func:`rescale_size`, :func:`preprocess`): mmcv ``imrescale`` with ``scale=(long_side,
  short_side)``: factor ``f = min(long_side / max(h, w), short_side / min(h, w))``, new size
  ``(int(h·f + 0.5), int(w·f + 0.5))``. The official code resizes the uint8 image with OpenCV's bilinear
  filter; here the uint8 image is converted to float32 (values 0-255) and resized with
  ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (the same half-pixel sampling as
  cv2's ``INTER_LINEAR``), then rounded and clamped to 0..255 like cv2's uint8 output. cv2 computes the
  interpolation in 11-bit fixed point, so individual pixels can differ by one grey level; no resize happens
  when the size is unchanged. Then RGB, ``(x - mean) / std`` with CLIP's mean/std on the 0-255 scale
  (:data:`CLIP_MEAN`, :data:`CLIP_STD`).
* **Dense logits** (:func:`dense_logits`): ``visual(x)[:, 1:]`` (the CLS token 0 is dropped) -> divide every
  patch feature by its L2 norm -> ``@ text.T`` (cosine similarities, no scale) -> ``[B, Q, gh, gw]`` (patch
  ``1 + r·gw + c`` at row ``r``, column ``c``) -> bilinear (``align_corners=False``) to the input size
  ``(h, w)``. When ``h`` or ``w`` is not a multiple of the patch the ``gh x gw`` map is stretched over the
  full input, like the official code.
* **Modes** (:func:`infer_logits`): ``whole`` and ``single`` run the whole model input through the model
  once; they differ in the input size (:func:`model_input_size`): ``whole`` resizes to short side 336
  (mmcv rule), ``single`` keeps the native resolution rounded to the patch grid; ``slide`` runs crops
  of ``crop x crop`` at ``stride`` (spec §2.4 window placement, :func:`slide_windows`) and averages the window
  logits (fp32 accumulator). All crops of an image are batched through the model, grouped by crop shape (edge
  crops of a small image can differ) and split into chunks whose estimated activation memory fits
  ``memory_budget``.
* **Post-processing** (:func:`postprocess`, in tiles within a memory budget, :mod:`naclip.tiles`), spec §2.5:
  bilinear resize of the logits to ``ori_shape``; PAMR
  guided by the normalised image resized to ``ori_shape`` (a ``RuntimeError`` such as an OOM skips PAMR with a
  warning); ``softmax(logit_scale · logits)`` over queries; per class the **max** over its queries (synonyms);
  argmax; pixels whose max class probability is ``< prob_thd`` get class 0; probabilities renormalised to sum
  1 over classes (``renormalize=False`` skips this, ``area_thd`` adds SCLIP's area filter). Post-processing
  runs in float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from naclip._validate import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive_int,
    check_probability,
    unwrap_int,
)
from naclip.config import DEFAULT_MEMORY_BUDGET, LOGIT_SCALE, MODES, SegmentConfig
from naclip.pamr import _check_dilations
from naclip.pamr import pamr as _pamr
from naclip.tiles import label_dtype, run_tiles

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LOGIT_SCALE",
    "MODES",
    "Window",
    "rescale_size",
    "model_input_size",
    "to_tensor_image",
    "preprocess",
    "normalize",
    "slide_windows",
    "dense_logits",
    "whole_logits",
    "slide_logits",
    "infer_logits",
    "crops_per_chunk",
    "postprocess",
]

#: CLIP mean / std on the 0-255 scale (RGB), as in mmseg's ``SegDataPreProcessor`` of the official configs.
CLIP_MEAN = (122.771, 116.746, 104.094)
CLIP_STD = (68.501, 66.632, 70.323)
#: the library defaults (:class:`naclip.config.SegmentConfig`, their one home) used in the signatures below
_DEFAULTS = SegmentConfig()

#: Vision model interface: ``visual(x[B, 3, h, w]) -> [B, 1 + gh·gw, D]``, with a ``patch_size`` attribute.
VisualFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Window:
    """One sliding window: rows ``y1:y2``, columns ``x1:x2`` of the (resized) image."""

    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y2 - self.y1, self.x2 - self.x1)


def rescale_size(
    height: int, width: int, short_side: int, long_side: int = _DEFAULTS.long_side
) -> tuple[int, int]:
    """mmcv ``imrescale`` target size for ``scale=(long_side, short_side)``.

    ``f = min(long_side / max(h, w), short_side / min(h, w))``; returns ``(int(h·f + 0.5), int(w·f + 0.5))``.
    E.g. 375x500 -> 336x448, 1024x2048 with short side 560 -> 560x1120. The result may be 0 for extreme aspect
    ratios (callers check it against the patch size).
    """
    check_positive_int("height", height)
    check_positive_int("width", width)
    check_positive_int("short_side", short_side)
    check_positive_int("long_side", long_side)
    f = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


def _round_to_grid(n: int, patch: int) -> int:
    """Nearest multiple of ``patch`` (halves up), at least one: ``max(patch, ⌊n/patch + ½⌋·patch)``."""
    return max(patch, (2 * n + patch) // (2 * patch) * patch)


def model_input_size(
    height: int,
    width: int,
    *,
    mode: str,
    patch_size: tuple[int, int],
    short_side: int | None,
    long_side: int | None,
) -> tuple[int, int]:
    """Size ``(h, w)`` the model sees for a ``height x width`` image in ``mode`` (the one home of the rule).

    * ``whole`` / ``slide``: :func:`rescale_size` with ``(short_side, long_side)`` (``long_side`` ``None`` ->
      2048); ``short_side=None`` keeps the original size. Sizes that are not multiples of the patch are kept
      (the official code: ``conv1`` drops the remainder and the patch map is stretched over the input).
    * ``single``: native resolution unless ``short_side`` / ``long_side`` are given, then scaled by ``f =
      min(short_side / min(h, w), long_side / max(h, w))`` over the sides given (``int(·f + 0.5)``); then
      every side is rounded to the nearest multiple of its patch size (halves up, at least one patch), so
      the patch grid covers the input exactly and no pixel is dropped. A size already on the grid (e.g.
      1024x2048 at patch 16) is used as is: no resize at all.
    """
    if mode != "single":
        if short_side is None:
            return height, width
        return rescale_size(
            height, width, short_side, _DEFAULTS.long_side if long_side is None else long_side
        )
    f = 1.0
    if short_side is not None or long_side is not None:
        f = min(
            short_side / min(height, width) if short_side is not None else math.inf,
            long_side / max(height, width) if long_side is not None else math.inf,
        )
    h, w = (int(height * f + 0.5), int(width * f + 0.5)) if f != 1.0 else (height, width)
    return _round_to_grid(h, patch_size[0]), _round_to_grid(w, patch_size[1])


def to_tensor_image(image: object) -> torch.Tensor:
    """uint8 RGB ``H x W x 3`` array/tensor -> float32 tensor ``[1, 3, H, W]`` with values 0-255."""
    if isinstance(image, torch.Tensor):
        t = image
    else:
        import numpy as np

        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"image: expected a uint8 HxWx3 numpy array or tensor, got {type(image).__name__}"
            )
        t = torch.from_numpy(np.ascontiguousarray(image))
    if t.ndim != 3 or t.shape[2] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"image: expected uint8 HxWx3, got shape {tuple(t.shape)} dtype {t.dtype}")
    return t.permute(2, 0, 1).unsqueeze(0).float()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - CLIP_MEAN) / CLIP_STD`` per RGB channel; ``x`` is ``[B, 3, H, W]`` on the 0-255 scale."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(
    image: object,
    *,
    short_side: int | None = _DEFAULTS.short_side,
    long_side: int = _DEFAULTS.long_side,
    size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint8 RGB ``H x W x 3`` -> normalised float32 ``[1, 3, h, w]`` resized per :func:`rescale_size`, or to
    ``size`` when given (e.g. from :func:`model_input_size`).

    ``short_side=None`` keeps the original size (no resize). The resize runs on ``device`` (CPU when
    ``None``).
    """
    x = to_tensor_image(image)
    h, w = x.shape[-2:]
    if size is not None:
        size = (check_positive_int("size[0]", size[0]), check_positive_int("size[1]", size[1]))
    elif short_side is not None:
        size = rescale_size(h, w, short_side, long_side)
        if min(size) <= 0:
            raise ValueError(
                f"image: {h}x{w} resized with short side {short_side} / long side {long_side} becomes "
                f"{size[0]}x{size[1]}; the aspect ratio is too extreme"
            )
    return _resize_normalize(x, size, device)


def resize_normalize(
    rgb: object, size: tuple[int, int], *, device: torch.device | str | None
) -> torch.Tensor:
    """:func:`preprocess` of a checked uint8 RGB ``H x W x 3`` array (:func:`naclip.io.load_image`'s output)
    to a checked ``size`` (:func:`model_input_size`); no validation (internal callers)."""
    t = rgb if isinstance(rgb, torch.Tensor) else torch.from_numpy(rgb)
    return _resize_normalize(t.permute(2, 0, 1).unsqueeze(0).float(), size, device)


def _resize_normalize(
    x: torch.Tensor, size: tuple[int, int] | None, device: torch.device | str | None
) -> torch.Tensor:
    """``[1, 3, H, W]`` 0-255 float -> moved to ``device``, resized to ``size`` like cv2's uint8 bilinear
    (``None`` or the same size: no resize), normalised."""
    if device is not None:
        x = x.to(device)
    if size is not None and tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
        x = x.round_().clamp_(0.0, 255.0)
    return normalize(x)


def slide_windows(
    height: int, width: int, crop: int = _DEFAULTS.crop, stride: int = _DEFAULTS.stride
) -> list[Window]:
    """Window placement of the official ``forward_slide`` (spec §2.4), row-major.

    ``n_h = max(H - crop + stride - 1, 0) // stride + 1`` (same for W); window ``(i, j)``: ``y1 = i·stride``,
    ``y2 = min(y1 + crop, H)``, ``y1 = max(y2 - crop, 0)`` (the last window is shifted back to end at the
    border); an image smaller than the crop gives one window covering it at its own size.
    """
    check_positive_int("height", height)
    check_positive_int("width", width)
    check_positive_int("crop", crop)
    check_positive_int("stride", stride)
    n_h = max(height - crop + stride - 1, 0) // stride + 1
    n_w = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n_h):
        for j in range(n_w):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append(Window(y1, y2, x1, x2))
    return out


def _patch_size(visual: object) -> tuple[int, int]:
    p = getattr(visual, "patch_size", None)
    if p is None:
        raise TypeError(f"visual: expected a model with a patch_size attribute, got {type(visual).__name__}")
    if isinstance(p, int):
        return (p, p)
    return (int(p[0]), int(p[1]))


def dense_logits(
    visual: VisualFn, images: torch.Tensor, text: torch.Tensor, *, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Cosine logits: ``[B, 3, h, w]`` -> ``[B, Q, *size]`` (model dtype; ``size`` default ``(h, w)``).

    ``feats = visual(images)[:, P:]`` (the ``P = visual.num_prefix_tokens`` prefix rows dropped, default 1 =
    CLS; a visual with ``needs_text`` true is called as ``visual(images, text)``) ``/ ||feats||`` per patch,
    ``@ text.T`` (``text`` ``[Q, D]``, cast to the features' dtype and device), reshaped row-major to ``[B, Q,
    gh, gw]`` with ``gh = h // ph``, ``gw = w // pw``, then bilinear (``align_corners=False``) to ``size``.
    """
    ph, pw = _patch_size(visual)
    b, _, h, w = images.shape
    gh, gw = h // ph, w // pw
    prefix = int(getattr(visual, "num_prefix_tokens", 1))
    feats = visual(images, text) if getattr(visual, "needs_text", False) else visual(images)
    if feats.ndim != 3 or feats.shape[0] != b or feats.shape[1] != prefix + gh * gw:
        raise RuntimeError(
            f"visual returned shape {tuple(feats.shape)}; "
            f"expected [{b}, {prefix + gh * gw}, D] for a {h}x{w} input"
        )
    feats = feats[:, prefix:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ text.to(device=feats.device, dtype=feats.dtype).T  # [B, N, Q]
    logits = logits.permute(0, 2, 1).reshape(b, -1, gh, gw)
    return F.interpolate(logits, size=size or (h, w), mode="bilinear", align_corners=False)


def _pad_to_patch(batch: torch.Tensor, patch: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """ClearCLIP's crop padding: zeros to the next multiple of the patch, ``left = pad_w // 2``, ``top =
    pad_h // 2`` (the rest right / bottom). Returns the padded batch and ``(top, left)``."""
    h, w = batch.shape[-2:]
    pad_h, pad_w = -h % patch[0], -w % patch[1]
    if not (pad_h or pad_w):
        return batch, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    return F.pad(batch, (left, pad_w - left, top, pad_h - top)), (top, left)


def whole_logits(
    visual: VisualFn, image: torch.Tensor, text: torch.Tensor, *, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Whole-image (or single-pass) logits ``[1, Q, H, W]`` in float32 (``[1, Q, *size]`` when given)."""
    return dense_logits(visual, image, text, size=size).float()


def crops_per_chunk(
    visual: object, crop_hw: tuple[int, int], memory_budget: int, *, element_size: int = 4
) -> int:
    """How many ``crop_hw`` crops to run through ``visual`` at once within ``memory_budget`` bytes.

    ``max(1, memory_budget // per_crop)`` with ``per_crop = element_size · T · 16·E`` bytes: the estimated
    peak activation memory of one crop through a ViT of width ``E`` with ``T = 1 + gh·gw`` tokens
    (``gh = crop_h // P_h``, ``gw = crop_w // P_w``). The blocks run ``F.scaled_dot_product_attention``
    (:mod:`naclip.model`), so attention needs ``O(T)`` memory (no ``T x T`` matrix) and the peak is
    dominated by per-token activations: the residual stream, ``ln`` output, packed ``q/k/v`` (``3E``) and
    attention output (``E``) ``[T, ~6E]`` plus the MLP hidden layer ``[T, 4E]`` and its GELU output
    ``[T, 4E]``, rounded up to ``16·E`` per token. ``E`` is read from ``visual.width`` or the wrapped
    open_clip ``transformer.width``, else 1024. The head count no longer enters the estimate.
    """
    ph, pw = _patch_size(visual)
    check_positive_int("memory_budget", memory_budget)
    t = 1 + (crop_hw[0] // ph) * (crop_hw[1] // pw)
    inner = getattr(visual, "visual", visual)
    tr = getattr(inner, "transformer", None)
    width = getattr(visual, "width", None) or getattr(tr, "width", None) or 1024
    per_crop = element_size * t * 16 * int(width)
    return max(1, int(memory_budget // per_crop))


def slide_logits(
    visual: VisualFn,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    crop: int = _DEFAULTS.crop,
    stride: int = _DEFAULTS.stride,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_batch: int | None = None,
    pad_crops: bool = False,
) -> torch.Tensor:
    """Sliding-window logits ``[1, Q, H, W]`` (float32): average of the window logits (spec §2.4).

    Every window's logits (already at window size) are added into a zero canvas and a count map; the result is
    ``sum / count``. Crops are grouped by shape and run in batches of :func:`crops_per_chunk` (or
    ``max_batch``) crops; batching does not change the result since every image in a batch is processed
    independently. ``pad_crops``: each crop is zero-padded to a patch multiple (:func:`_pad_to_patch`) and
    its logits cut back to the crop (ClearCLIP) instead of stretching the patch grid over it.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image: expected [1, 3, H, W], got {tuple(image.shape)}")
    _, _, height, width = image.shape
    windows = slide_windows(height, width, crop, stride)
    groups: dict[tuple[int, int], list[Window]] = {}
    for win in windows:
        groups.setdefault(win.shape, []).append(win)
    acc: torch.Tensor | None = None
    count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=image.device)
    elem = image.element_size()
    for shape, wins in groups.items():
        if max_batch is not None:
            chunk = check_positive_int("max_batch", max_batch)
        else:
            chunk = crops_per_chunk(visual, shape, memory_budget, element_size=elem)
        for start in range(0, len(wins), chunk):
            part = wins[start : start + chunk]
            batch = torch.cat([image[:, :, w.y1 : w.y2, w.x1 : w.x2] for w in part], dim=0)
            top, left = 0, 0
            if pad_crops:
                batch, (top, left) = _pad_to_patch(batch, _patch_size(visual))
            out = dense_logits(visual, batch, text).float()[
                :, :, top : top + shape[0], left : left + shape[1]
            ]
            if acc is None:
                acc = torch.zeros((1, out.shape[1], height, width), dtype=torch.float32, device=out.device)
                count = count.to(out.device)
            for k, w in enumerate(part):
                acc[:, :, w.y1 : w.y2, w.x1 : w.x2] += out[k : k + 1]
                count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
    if acc is None:  # unreachable: slide_windows always returns at least one window
        raise RuntimeError("slide_logits: no window")
    return acc / count


def infer_logits(
    visual: VisualFn,
    image: torch.Tensor,
    text: torch.Tensor,
    *,
    mode: str = _DEFAULTS.mode,
    crop: int = _DEFAULTS.crop,
    stride: int = _DEFAULTS.stride,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_batch: int | None = None,
    pad_crops: bool = False,
    whole_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits ``[1, Q, H, W]`` (float32) of a normalised image ``[1, 3, H, W]`` for ``mode`` in
    :data:`MODES`. ``pad_crops``: see :func:`slide_logits`; ``whole_size``: whole / single modes resize the
    patch logits straight to this size (ClearCLIP / SCLIP / SC-CLIP resize once, to the output size)."""
    check_choice("mode", mode, MODES)
    check_model_input(image)
    if mode == "slide":
        check_positive_int("crop", crop)
        check_positive_int("stride", stride)
    check_crop(mode, crop, tuple(image.shape[-2:]), _patch_size(visual))
    return run_logits(
        visual, image, text, mode=mode, crop=crop, stride=stride, memory_budget=memory_budget,
        max_batch=max_batch, pad_crops=pad_crops, whole_size=whole_size,
    )  # fmt: skip


def check_crop(mode: str, crop: int, hw: tuple[int, int], patch: tuple[int, int]) -> None:
    """The model input ``hw`` holds one ``patch`` and, in ``slide`` mode, so does a window of ``crop``."""
    (h, w), (ph, pw) = hw, patch
    if h < ph or w < pw:
        raise ValueError(f"image: {h}x{w} is smaller than one {ph}x{pw} patch")
    if mode == "slide" and (min(crop, h) < ph or min(crop, w) < pw):
        raise ValueError(f"crop: {crop} is smaller than one {ph}x{pw} patch")


def run_logits(
    visual: VisualFn, image: torch.Tensor, text: torch.Tensor, *, mode: str, crop: int, stride: int,
    memory_budget: int, max_batch: int | None = None, pad_crops: bool = False,
    whole_size: tuple[int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """:func:`infer_logits` on checked arguments (no validation; internal callers)."""
    if mode == "slide":
        return slide_logits(
            visual, image, text, crop=crop, stride=stride, memory_budget=memory_budget,
            max_batch=max_batch, pad_crops=pad_crops,
        )  # fmt: skip
    return whole_logits(visual, image, text, size=whole_size)


@dataclass(frozen=True)
class PostSettings:
    """Checked post-processing settings (what :func:`postprocess` validated; internal callers that built
    them from checked values pass them to :func:`run_postprocess` directly). ``keep_probs`` is resolved."""

    query_idx: torch.Tensor
    ori_shape: tuple[int, int]
    num_classes: int
    pamr_steps: int
    pamr_dilations: tuple[int, ...]
    prob_thd: float
    logit_scale: float
    below_thd_label: int
    area_thd: float | None
    renormalize: bool
    memory_budget: int
    keep_probs: bool
    tile_hw: tuple[int, int] | None = None


def postprocess(
    logits: torch.Tensor,
    image: torch.Tensor,
    query_idx: torch.Tensor | Sequence[int],
    *,
    ori_shape: tuple[int, int],
    num_classes: int | None = None,
    pamr_steps: int = _DEFAULTS.pamr_steps,
    pamr_dilations: Sequence[int] = _DEFAULTS.pamr_dilations,
    prob_thd: float = _DEFAULTS.prob_thd,
    logit_scale: float = LOGIT_SCALE,
    below_thd_label: int = 0,
    area_thd: float | None = None,
    renormalize: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    keep_probs: bool | None = True,
    probs_sink: Callable[[torch.Tensor, int, int], None] | None = None,
    tile_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``[1, Q, H, W]`` -> ``(labels [oh, ow], probs [C, oh, ow] float32 or None)`` (spec §2.5),
    computed in tiles within ``memory_budget`` bytes (:mod:`naclip.tiles`), equal to the untiled result.

    Args:
        logits: floating ``[1, Q, H, W]`` cosine logits (any device; computed on it in float32).
        image: the normalised model input ``[1, 3, H', W']`` (floating; PAMR guidance, resized to
            ``ori_shape``).
        query_idx: ``[Q]`` class index of every query, in ``[0, num_classes)``.
        ori_shape: output size ``(oh, ow)``, positive ints.
        num_classes: ``C``; default ``max(query_idx) + 1``.
        pamr_steps: PAMR iterations (``0`` = off); pamr_dilations: its dilations.
        prob_thd: background threshold in ``[0, 1]``; logit_scale: softmax temperature (a finite number).
        below_thd_label: the label of pixels below ``prob_thd`` (``0``, the official background class;
            :class:`naclip.Segmenter` passes another for user classes without a background).
        area_thd: SCLIP's area filter (``None`` = off): every class ``c >= 1`` whose argmax area is ``<=
            area_thd * (area of all classes >= 1)`` gets ``P[c] = 0`` before the argmax.
        renormalize: divide ``P`` by its sum over classes (NACLIP); ``False`` returns ``P`` as is.
        memory_budget: bytes of working memory per tile (positive int; sets the tile size, not the result).
        keep_probs: return ``probs`` (``True``), not (``False``, ``None`` is returned), or ``None``: only when
            ``4·C·oh·ow <= memory_budget``.
        probs_sink: ``sink(block [C, th, tw] float32, r0, c0)`` called with every tile's probabilities (e.g.
            :func:`naclip.io.save_probs_streaming`'s writer), so they can be streamed without keeping them.
        tile_hw: force the tile core size ``(th, tw)`` (tests, tuning); default from ``memory_budget``.

    With ``L = bilinear(logits, ori_shape, align_corners=False)`` (float32), optionally
    ``L = pamr(bilinear(image, ori_shape), L, pamr_steps, pamr_dilations)`` (on a ``RuntimeError`` such as
    an OOM, PAMR is skipped with a ``RuntimeWarning``)::

        p[q]   = softmax_q(logit_scale · L[q])                   # [Q, oh, ow]
        P[c]   = max_{q : query_idx[q] = c} p[q]                 # 0 for a class without queries
        labels = argmax_c P;   labels[max_c P < prob_thd] = below_thd_label
        probs  = P / sum_c P

    Tiles carry a halo of ``pamr_steps · max(pamr_dilations)`` pixels (PAMR's reach) and the resize of every
    tile uses the full resize's indices and weights, so the tiling changes neither labels nor probabilities.
    Returns ``labels`` in the smallest integer dtype holding the classes (:func:`naclip.tiles.label_dtype`:
    ``uint8`` up to 256 classes) and ``probs`` (``float32`` or ``None``), both on the CPU. Raises
    ``TypeError`` / ``ValueError`` naming the argument for a bad input.
    """
    check_logits_and_image(logits, image)
    oh, ow = check_shape("ori_shape", ori_shape)
    qidx, n_cls = check_query_idx(query_idx, logits.shape[1], logits.device, num_classes)
    settings = PostSettings(
        query_idx=qidx, ori_shape=(oh, ow), num_classes=n_cls,
        pamr_steps=check_int("pamr_steps", pamr_steps, minimum=0),
        pamr_dilations=tuple(pamr_dilations), prob_thd=check_probability("prob_thd", prob_thd),
        logit_scale=check_number("logit_scale", logit_scale),
        below_thd_label=check_int("below_thd_label", below_thd_label, minimum=0),
        area_thd=None if area_thd is None else check_probability("area_thd", area_thd),
        renormalize=renormalize, memory_budget=check_positive_int("memory_budget", memory_budget),
        keep_probs=_resolve_keep_probs(keep_probs, n_cls * oh * ow, memory_budget),
        tile_hw=None if tile_hw is None else check_shape("tile_hw", tile_hw),
    )  # fmt: skip
    if settings.pamr_steps > 0:
        _check_dilations(settings.pamr_dilations)
    return run_postprocess(logits, image, settings, probs_sink=probs_sink)


def check_logits_and_image(logits: object, image: object) -> None:
    """The tensor checks of :func:`postprocess`: floating ``logits [1, Q, H, W]`` (non-empty) and a
    normalised floating ``image [1, 3, H', W']``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a floating tensor [1, Q, H, W], got {shape}")
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating tensor, got dtype {logits.dtype}")
    if logits.shape[1] < 1 or logits.shape[2] < 1 or logits.shape[3] < 1:
        raise ValueError(f"logits: expected a non-empty [1, Q, H, W] tensor, got {tuple(logits.shape)}")
    check_model_input(image)


def check_model_input(image: object) -> None:
    """A normalised floating model input ``[1, 3, H, W]``; ``ValueError`` / ``TypeError`` otherwise."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or tuple(image.shape[:2]) != (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a normalised float tensor [1, 3, H, W], got {shape}")
    if not image.is_floating_point():
        raise TypeError(f"image: expected a normalised floating tensor, got dtype {image.dtype}")


def check_shape(name: str, shape: object) -> tuple[int, int]:
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence) or len(shape) != 2:
        raise ValueError(f"{name}: expected (height, width), got {shape!r}")
    return tuple(check_positive_int(f"{name}[{i}]", unwrap_int(s)) for i, s in enumerate(shape))  # type: ignore


def check_query_idx(
    query_idx: object, num_queries: int, device: torch.device, num_classes: int | None
) -> tuple[torch.Tensor, int]:
    """``(query_idx as a long tensor on device, number of classes)``: one integer class index per query
    in ``[0, num_classes)`` (default ``num_classes = max(query_idx) + 1``)."""
    if num_classes is not None:
        check_positive_int("num_classes", num_classes)
    qidx = torch.as_tensor(query_idx, device=device)
    if qidx.is_floating_point() or qidx.is_complex() or qidx.dtype == torch.bool:
        raise TypeError(f"query_idx: expected integer class indices, got dtype {qidx.dtype}")
    qidx = qidx.long()
    if qidx.ndim != 1 or qidx.numel() != num_queries:
        raise ValueError(
            f"query_idx: expected {num_queries} entries (one per query), got shape {tuple(qidx.shape)}"
        )
    n_cls = int(qidx.max()) + 1 if num_classes is None else int(num_classes)
    if int(qidx.min()) < 0 or int(qidx.max()) >= n_cls:
        raise ValueError(f"query_idx: values must lie in [0, {n_cls}), got {qidx.tolist()}")
    return qidx, n_cls


def _resolve_keep_probs(keep_probs: object, pixels_x_classes: int, memory_budget: int) -> bool:
    """``keep_probs`` (a bool), or for ``None`` whether ``4·C·oh·ow <= memory_budget``."""
    check_bool("keep_probs", keep_probs, allow_none=True)
    return 4 * pixels_x_classes <= memory_budget if keep_probs is None else bool(keep_probs)


def run_postprocess(
    logits: torch.Tensor,
    image: torch.Tensor,
    s: PostSettings,
    *,
    probs_sink: Callable[[torch.Tensor, int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`postprocess` on checked settings (no validation): tiled, or untiled for ``area_thd`` /
    ``renormalize=False`` (the area filter needs the whole argmax map)."""
    (oh, ow), dils, qidx = s.ori_shape, s.pamr_dilations, s.query_idx
    if s.area_thd is not None or not s.renormalize:
        return _postprocess_untiled(
            logits, image, qidx, oh=oh, ow=ow, n_cls=s.num_classes, pamr_steps=s.pamr_steps,
            pamr_dilations=dils, thd=s.prob_thd, logit_scale=s.logit_scale,
            below_thd_label=s.below_thd_label, area=s.area_thd, renormalize=s.renormalize,
        )  # fmt: skip
    kw = {"num_classes": s.num_classes, "prob_thd": s.prob_thd, "logit_scale": s.logit_scale}
    kw |= {"below_thd_label": s.below_thd_label}
    kw |= {"memory_budget": s.memory_budget, "keep_probs": s.keep_probs, "probs_sink": probs_sink}
    try:
        return run_tiles(
            logits, image, qidx, ori_shape=(oh, ow), pamr_steps=s.pamr_steps, pamr_dilations=dils,
            tile_hw=s.tile_hw, **kw,
        )  # fmt: skip
    except RuntimeError as exc:  # e.g. out of memory on a huge image: keep the unrefined logits
        if s.pamr_steps == 0:
            raise
        warnings.warn(f"PAMR skipped: {exc}", RuntimeWarning, stacklevel=2)
    return run_tiles(logits, image, qidx, ori_shape=(oh, ow), pamr_steps=0, pamr_dilations=dils, **kw)


def _postprocess_untiled(
    logits, image, qidx, *, oh, ow, n_cls, pamr_steps, pamr_dilations, thd, logit_scale, below_thd_label,
    area, renormalize,
):  # fmt: skip
    """The whole-image post-processing (spec §2.5) for the options that cannot be tiled (``area_thd``,
    ``renormalize=False``): ``O(C·oh·ow)`` memory."""
    logits = F.interpolate(logits.float(), size=(oh, ow), mode="bilinear", align_corners=False)
    if pamr_steps > 0:
        guide = F.interpolate(image.float(), size=(oh, ow), mode="bilinear", align_corners=False)
        try:
            logits = _pamr(guide.to(logits.device), logits, pamr_steps, pamr_dilations)
        except RuntimeError as exc:  # e.g. out of memory on a huge image: keep the unrefined logits
            warnings.warn(f"PAMR skipped: {exc}", RuntimeWarning, stacklevel=2)
    probs = (logits[0] * float(logit_scale)).softmax(dim=0)  # [Q, oh, ow]
    if n_cls != qidx.numel() or not torch.equal(qidx, torch.arange(n_cls, device=qidx.device)):
        cls_probs = probs.new_zeros((n_cls, oh, ow))
        # max over each class's queries; probabilities are >= 0 so the zero init is neutral
        index = qidx.view(-1, 1, 1).expand_as(probs)
        cls_probs.scatter_reduce_(0, index, probs, "amax", include_self=True)
        probs = cls_probs
    if area is not None:
        probs = _area_filter(probs, area)
    top = probs.max(dim=0).values
    labels = probs.argmax(dim=0)
    labels[top < thd] = below_thd_label
    if renormalize:
        probs = probs / probs.sum(dim=0, keepdim=True)
    return labels.to(label_dtype(max(n_cls, below_thd_label + 1))).cpu(), probs.cpu()


def _area_filter(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """SCLIP's ``area_thd``: zero the probabilities of every class ``c >= 1`` whose argmax area is ``<=
    area_thd * (total argmax area of classes >= 1)`` (class 0, the background, is never removed)."""
    area = torch.bincount(probs.argmax(dim=0).flatten(), minlength=probs.shape[0]).to(probs.dtype)
    keep = (area[1:] > area_thd * area[1:].sum()).to(probs.dtype)
    return torch.cat([probs[:1], probs[1:] * keep.view(-1, 1, 1)], dim=0)
