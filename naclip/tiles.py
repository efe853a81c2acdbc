"""Tiled, exact post-processing: resize + PAMR + softmax + synonym max + threshold + argmax in bounded memory.

Contract (validation happens in :func:`naclip.inference.postprocess`, the public entry point): the output
``(oh, ow)`` is cut into tiles (:func:`plan_tiles`); every tile is computed on itself plus a **halo** of
``pamr_steps · max(pamr_dilations)`` pixels on every side that is inside the image (PAMR's reach, see
:mod:`naclip.pamr`), and only its core is kept. The bilinear resize (:func:`bilinear_axis`,
:func:`resize_region`) evaluates each output pixel from the *full* resize's source indices and weights, so a
tile's resized logits and guidance equal the untiled ones pixel for pixel. Hence the labels and probabilities
do not depend on the tiling. Labels come back in the smallest integer dtype holding the classes
(:func:`label_dtype`); probabilities are kept in RAM, dropped, or streamed tile by tile to a sink (an ``.npy``
writer, :func:`naclip.io.save_probs_streaming`). Design notes and the memory model: ``docs/postprocess.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from naclip.pamr import pamr as _pamr

__all__ = ["BilinearAxis", "bilinear_axis", "label_dtype", "plan_tiles", "resize_region", "run_tiles"]

#: ``(i0, i1, w0, w1)``: per output index the two source indices and their weights (float32).
BilinearAxis = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: ``sink(block [C, th, tw] float32, r0, c0)`` receives the probabilities of each tile.
ProbsSink = Callable[[torch.Tensor, int, int], None]
#: Pixels per chunk of the class softmax (its temporaries are ``~(2Q + C)`` floats per chunk pixel).
CLASSIFY_CHUNK_PIXELS = 1 << 16


def label_dtype(num_classes: int) -> torch.dtype:
    """Smallest integer dtype holding labels ``0 .. num_classes-1``: ``uint8`` (<= 256 classes), ``int16``
    (<= 32768), else ``int32``."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32768:
        return torch.int16
    return torch.int32


def bilinear_axis(n_in: int, n_out: int, device: torch.device | str | None = None) -> BilinearAxis:
    """Source indices and weights of a bilinear ``align_corners=False`` resize of one axis ``n_in -> n_out``.

    ``scale = n_in / n_out`` (float32), ``src = max(scale·(i + 0.5) - 0.5, 0)`` (evaluated like a fused
    multiply-add, then rounded to float32), ``i0 = min(floor(src), n_in - 1)``,
    ``i1 = min(i0 + 1, n_in - 1)``, ``w1 = clamp(src - i0, 0, 1)``, ``w0 = 1 - w1``: the indices and
    weights of ``F.interpolate`` (equal to them on this torch build, checked by the tests).
    """
    scale = (torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)).double()
    dst = torch.arange(n_out, dtype=torch.float64)  # computed on the CPU (float64), then moved
    src = (scale * (dst + 0.5) - 0.5).float().clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    w1 = (src - i0.float()).clamp_(0.0, 1.0)
    return tuple(t.to(device) for t in (i0, (i0 + 1).clamp_(max=n_in - 1), 1.0 - w1, w1))  # type: ignore


def resize_region(
    src: torch.Tensor, rows: BilinearAxis, cols: BilinearAxis, r: tuple[int, int], c: tuple[int, int]
) -> torch.Tensor:
    """Rows ``r[0]:r[1]``, columns ``c[0]:c[1]`` of the bilinear resize of ``src`` ``[K, H, W]`` (float32)
    whose full-size axes are ``rows`` / ``cols`` (:func:`bilinear_axis`); ``[K, r1-r0, c1-c0]``.

    ``out = (s[y0,x0]·wx0 + s[y0,x1]·wx1)·wy0 + (s[y1,x0]·wx0 + s[y1,x1]·wx1)·wy1``: each output pixel is
    the same arithmetic whatever the region, so any tiling reproduces the full resize exactly. Only the
    source rows the region needs are read.
    """
    y0, y1, wy0, wy1 = (t[r[0] : r[1]] for t in rows)
    x0, x1, wx0, wx1 = (t[c[0] : c[1]] for t in cols)
    lo, hi = int(y0.min()), int(y1.max()) + 1
    band = src[:, lo:hi]
    horiz = band[:, :, x0] * wx0 + band[:, :, x1] * wx1  # [K, hi-lo, tw]
    y0, y1 = y0 - lo, y1 - lo
    out = horiz[:, y0] * wy0[:, None]
    out += horiz[:, y1] * wy1[:, None]
    return out


def plan_tiles(
    height: int, width: int, *, halo: int, max_pixels: int, tile_hw: tuple[int, int] | None = None
) -> list[tuple[int, int, int, int]]:
    """Tiles ``(r0, r1, c0, c1)`` covering ``height x width`` row-major.

    ``tile_hw`` fixes the core size; otherwise one tile when the whole image fits ``max_pixels``, else
    full-width strips when a strip with its halo rows fits with a core at least as tall as the halo, else
    squares whose side ``s`` satisfies ``(s + 2·halo)² <= max_pixels`` (at least 16 px).
    """
    if tile_hw is not None:
        th, tw = tile_hw
    elif height * width <= max_pixels:
        th, tw = height, width
    elif max_pixels // width - 2 * halo >= max(halo, 16):
        th, tw = max_pixels // width - 2 * halo, width
    else:
        side = max(16, math.isqrt(max_pixels) - 2 * halo)
        th, tw = side, side
    return [
        (r0, min(r0 + th, height), c0, min(c0 + tw, width))
        for r0 in range(0, height, th)
        for c0 in range(0, width, tw)
    ]


def bytes_per_pixel(num_queries: int, num_classes: int, num_dilations: int, pamr_on: bool) -> int:
    """Estimated peak working memory per pixel of a tile (its halo included): ``4·(peak floats + 4)``.

    The phases do not overlap, so the peak is their maximum: the resize ``3Q`` (output and two gathers);
    PAMR's affinities ``Q + 3·8n + 18`` (the resized logits, affinities and their pixel-major softmax copies,
    guidance temporaries) and iterations ``3Q + 8n + 3`` (input, padded and new masks, affinities, guidance);
    the class softmax ``Q + C`` (the tile's logits and its core's probabilities; its own temporaries are
    bounded by :data:`CLASSIFY_CHUNK_PIXELS`)."""
    q, c, n = num_queries, num_classes, num_dilations
    floats = max(3 * q, q + c)
    if pamr_on:
        floats = max(floats, q + 24 * n + 18, 3 * q + 8 * n + 3)
    return 4 * (floats + 4)


def run_tiles(
    logits: torch.Tensor,
    image: torch.Tensor,
    qidx: torch.Tensor,
    *,
    ori_shape: tuple[int, int],
    num_classes: int,
    pamr_steps: int,
    pamr_dilations: Sequence[int],
    prob_thd: float,
    logit_scale: float,
    memory_budget: int,
    below_thd_label: int = 0,
    keep_probs: bool,
    probs_sink: ProbsSink | None = None,
    tile_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated inputs (see :func:`naclip.inference.postprocess`) -> ``(labels [oh, ow], probs or None)``
    on the CPU; ``probs`` ``[C, oh, ow]`` float32 only when ``keep_probs``; every tile's probabilities go to
    ``probs_sink`` when given."""
    oh, ow = ori_shape
    src = logits[0].float()
    guide_src = image[0].float().to(src.device) if pamr_steps > 0 else None
    halo = pamr_steps * max(pamr_dilations) if pamr_steps > 0 else 0
    bpp = bytes_per_pixel(src.shape[0], num_classes, len(pamr_dilations), pamr_steps > 0)
    rows = bilinear_axis(src.shape[1], oh, src.device)
    cols = bilinear_axis(src.shape[2], ow, src.device)
    if guide_src is not None:
        g_rows = bilinear_axis(guide_src.shape[1], oh, src.device)
        g_cols = bilinear_axis(guide_src.shape[2], ow, src.device)
    arange = torch.arange(num_classes, device=qidx.device)
    identity = num_classes == qidx.numel() and torch.equal(qidx, arange)
    ldtype = label_dtype(max(num_classes, below_thd_label + 1))
    labels = torch.empty((oh, ow), dtype=ldtype)
    probs_all = torch.empty((num_classes, oh, ow), dtype=torch.float32) if keep_probs else None
    tiles = plan_tiles(oh, ow, halo=halo, max_pixels=max(1, memory_budget // bpp), tile_hw=tile_hw)
    for r0, r1, c0, c1 in tiles:
        er0, er1, ec0, ec1 = max(r0 - halo, 0), min(r1 + halo, oh), max(c0 - halo, 0), min(c1 + halo, ow)
        lg = resize_region(src, rows, cols, (er0, er1), (ec0, ec1))
        if guide_src is not None:
            guide = resize_region(guide_src, g_rows, g_cols, (er0, er1), (ec0, ec1))
            lg = _pamr(guide[None], lg[None], pamr_steps, tuple(pamr_dilations))[0]
            del guide
        core = lg[:, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0]
        lab, prob = _classify(core, qidx, num_classes, identity, prob_thd, logit_scale, below_thd_label)
        del lg, core
        labels[r0:r1, c0:c1] = lab.cpu()
        if probs_sink is not None:
            probs_sink(prob, r0, c0)
        if probs_all is not None:
            probs_all[:, r0:r1, c0:c1] = prob.cpu()
    return labels, probs_all


def _softmax_last(z: torch.Tensor) -> torch.Tensor:
    """``softmax(z, dim=-1)`` (float32) of a contiguous ``[..., K]`` tensor, one ``K``-vector per pixel.

    torch's softmax over a *non-last* dim vectorises across pixels, so which pixels fall in a scalar tail
    (and round differently by one ulp) depends on the tensor's size, i.e. on the tile. Over the last,
    contiguous dim every pixel's ``K`` values go through the same vector/tail split whatever the tile, so
    the result of a pixel depends on its values only (``docs/postprocess.md``).
    """
    return z.softmax(dim=-1)


def _classify(
    logits: torch.Tensor, qidx: torch.Tensor, n_cls: int, identity: bool, thd: float, scale: float, below: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[Q, h, w]`` logits -> labels ``[h, w]`` (pixels below ``thd`` get ``below``; the smallest dtype
    holding ``max(n_cls, below + 1)`` labels) and renormalised class probabilities ``[C, h, w]`` (a view of a
    pixel-major ``[h, w, C]`` tensor; spec §2.5 steps 3-6), computed in row chunks of about
    :data:`CLASSIFY_CHUNK_PIXELS` pixels so their temporaries stay small."""
    q, h, w = logits.shape
    labels = torch.empty((h, w), dtype=label_dtype(max(n_cls, below + 1)), device=logits.device)
    probs = torch.empty((h, w, n_cls), dtype=torch.float32, device=logits.device)
    step = max(1, CLASSIFY_CHUNK_PIXELS // max(w, 1))
    for r in range(0, h, step):
        _classify_rows(logits[:, r : r + step], qidx, identity, thd, scale, below, labels[r : r + step],
                       probs[r : r + step])  # fmt: skip
    return labels, probs.permute(2, 0, 1)


def _classify_rows(logits, qidx, identity, thd, scale, below, labels_out, probs_out) -> None:
    """One row chunk of :func:`_classify`, written into ``labels_out [h, w]`` / ``probs_out [h, w, C]``."""
    z = torch.empty(probs_out.shape[:2] + (logits.shape[0],), dtype=torch.float32, device=logits.device)
    torch.mul(logits.permute(1, 2, 0), float(scale), out=z)  # pixel-major [h, w, Q]
    p = _softmax_last(z)
    del z
    if not identity:
        # max over each class's queries; probabilities are >= 0 so the zero init is neutral
        probs_out.zero_().scatter_reduce_(-1, qidx.expand_as(p), p, "amax", include_self=True)
    else:
        probs_out.copy_(p)
    del p
    lab = probs_out.argmax(dim=-1)
    lab[probs_out.amax(dim=-1) < thd] = below
    labels_out.copy_(lab)
    probs_out.div_(probs_out.sum(dim=-1, keepdim=True))
