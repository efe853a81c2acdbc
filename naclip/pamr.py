"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as used by NACLIP's post-processing.

Behaviour (spec §2.6), for an image ``I`` ``[B, K, h, w]`` (the normalised input image) and a mask ``M``
``[B, C, h, w]`` (the class logits):

* For every dilation ``d`` the 8 neighbours at offsets ``(dy·d, dx·d)``, ``dy, dx ∈ {-1, 0, 1}``, ``(dy, dx) ≠
  (0, 0)``, in the row-major order ``(-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1)``, are read
  with **replicate** padding (a position outside the image reads the nearest border pixel). With ``n``
  dilations there are ``8n`` neighbours.
* ``std_k(p)`` is the **unbiased** standard deviation (``torch.std``, divisor ``9n - 1``) of channel ``k``
  over the ``9n`` samples "centre + 8 neighbours" of every dilation (the centre appears once per dilation).
* Affinity logits ``a_j(p) = mean_k( -|I_k(p) - I_k(p + o_j)| / (1e-8 + 0.1·std_k(p)) )``, then a softmax over
  the ``8n`` neighbours ``j`` (the centre pixel is not a neighbour and is never propagated from).
* ``num_iter`` times: ``M(p) <- sum_j a_j(p) · M(p + o_j)`` (replicate border), for every channel at once.

The mask is first resized to the image size (bilinear, ``align_corners=True``) exactly like the original code;
it is a no-op when the sizes already match (the case in NACLIP, which resizes both to ``ori_shape``
beforehand).

Everything is vectorised over pixels and channels; the only Python loops run over the ``8n`` neighbour offsets
and the iterations. Memory: about ``(8n + 6K)·B·h·w + 2·B·C·(h + 2d)·(w + 2d)`` floats (``d`` the largest
dilation; the official code materialises ``8n·B·C·h·w`` for the mask propagation).

Reach: the output at a pixel depends only on the image and mask within ``num_iter · max(dilations)`` pixels
(Chebyshev distance) of it, so a tile computed with a halo that wide (:mod:`naclip.tiles`) equals the
untiled result on its core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from naclip._validate import check_int, check_ints

__all__ = ["pamr", "neighbour_offsets"]

_UNIT_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The ``8·len(dilations)`` neighbour offsets ``(dy, dx)`` in PAMR's order (dilation-major)."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _UNIT_OFFSETS]


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
    return check_ints("dilations", dilations, minimum=1)


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """View of ``x[p + (dy, dx)]`` for every ``p`` from a replicate-padded tensor (pad ``pad`` on every
    side)."""
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


@torch.no_grad()
def pamr(
    image: torch.Tensor,
    mask: torch.Tensor,
    num_iter: int = 10,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Refine ``mask`` with PAMR guided by ``image``.

    Args:
        image: ``[B, K, h, w]`` floating guidance image (NACLIP: the normalised RGB input resized to the
            output size, ``K = 3``).
        mask: ``[B, C, h', w']`` floating mask/logits; resized to ``(h, w)`` with bilinear
            ``align_corners=True`` when ``(h', w') != (h, w)``.
        num_iter: number of propagation steps (``>= 0``; 0 returns the resized mask).
        dilations: neighbour distances in pixels; default ``(8, 16)`` as in NACLIP.

    Returns:
        ``[B, C, h, w]`` refined mask in ``float32`` (computed in float32 whatever the input dtypes; cast it
        back yourself if needed, as NACLIP does).
    """
    if not isinstance(image, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"image/mask: expected torch.Tensor, got {type(image).__name__} and {type(mask).__name__}"
        )
    if image.ndim != 4 or mask.ndim != 4:
        raise ValueError(
            f"image/mask: expected 4-D [B, K, h, w] and [B, C, h, w], got shapes {tuple(image.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if image.shape[0] != mask.shape[0]:
        raise ValueError(f"image/mask: batch sizes differ ({image.shape[0]} vs {mask.shape[0]})")
    if not image.is_floating_point() or not mask.is_floating_point():
        raise TypeError(f"image/mask: expected floating tensors, got {image.dtype} and {mask.dtype}")
    num_iter = check_int("num_iter", num_iter, minimum=0)
    dils = _check_dilations(dilations)

    image = image.float()
    mask = mask.float()
    h, w = image.shape[-2:]
    if tuple(mask.shape[-2:]) != (h, w):
        mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=True)
    aff = _affinities(image, dils)
    offsets = neighbour_offsets(dils)
    pad = max(dils)
    for _ in range(num_iter):
        m_pad = F.pad(mask, (pad, pad, pad, pad), mode="replicate")
        del mask
        mask = torch.zeros(m_pad.shape[:2] + (h, w), dtype=m_pad.dtype, device=m_pad.device)
        for j, (dy, dx) in enumerate(offsets):
            mask.addcmul_(_shifted(m_pad, pad, dy, dx, h, w), aff[:, j : j + 1])
        del m_pad
    return mask


def _affinities(image: torch.Tensor, dils: tuple[int, ...]) -> torch.Tensor:
    """Softmax-normalised affinities ``[B, 8n, h, w]`` of the float32 guidance ``image`` ``[B, K, h, w]``.

    The unbiased std over the ``9n`` samples is computed in two passes (mean, then squared deviations) over
    shifted views of the replicate-padded image, so no ``[B, K, 9n, h, w]`` stack is materialised.
    """
    offsets = neighbour_offsets(dils)
    pad = max(dils)
    n_dil, h, w = len(dils), image.shape[-2], image.shape[-1]
    img_pad = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    n_samples = 9 * n_dil  # the centre counts once per dilation
    total = image * n_dil
    for dy, dx in offsets:
        total += _shifted(img_pad, pad, dy, dx, h, w)
    mean = total.div_(n_samples)
    dev = image - mean
    sq = dev.mul_(dev).mul_(n_dil)
    for dy, dx in offsets:
        d = _shifted(img_pad, pad, dy, dx, h, w) - mean
        sq.addcmul_(d, d)
    del mean, d
    denom = sq.div_(n_samples - 1).sqrt_().mul_(0.1).add_(1e-8)  # 1e-8 + 0.1·std
    aff = torch.empty((image.shape[0], len(offsets), h, w), dtype=image.dtype, device=image.device)
    k = image.shape[1]
    for j, (dy, dx) in enumerate(offsets):
        diff = (image - _shifted(img_pad, pad, dy, dx, h, w)).abs_().div_(denom)
        torch.sum(diff, dim=1, out=aff[:, j])
        aff[:, j].div_(-k)
    # softmax over the neighbours along the last, contiguous dim of a pixel-major copy: every pixel
    # (8n values) takes the same vector/tail code path whatever the tensor's size, so tiles agree bit for bit
    # (over dim 1 torch vectorises across pixels and the scalar tail depends on the size)
    soft = aff.permute(0, 2, 3, 1).contiguous().softmax(dim=-1)
    return aff.copy_(soft.permute(0, 3, 1, 2))
