"""The one home of the Gaussian bias constants and formulas shared by every backend.

``G = exp(coef * d2)`` with ``coef = -1 / (2 sigma^2)`` and ``d2`` the squared grid distance;
:data:`BIAS_EPS`, the log2(e) conversion, and the band radius: grid rows farther apart than ``R`` have
``|bias_scale| * G < BIAS_EPS`` (forward), and also ``G < BIAS_EPS`` and ``(d^2 / sigma^2) G < BIAS_EPS``
(backward, when sigma or bias_scale is learnt). Proofs: ``docs/kernel.md`` ("Band bound").
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BIAS_EPS",
    "GRAD_U",
    "LN2",
    "LOG2E",
    "band_radius",
    "band_rows",
    "band_rows_tensor",
    "gaussian",
    "gaussian_coef",
]

#: Bias terms below this (natural-log logit units) may be dropped: below the fp32 resolution of a logit ~1.
BIAS_EPS = 2.0**-24
LOG2E = 1.4426950408889634  # log2(e): natural-log logits -> log2 units (exp2-based softmax)
LN2 = 0.6931471805599453  # ln(2): log2 units -> natural log
#: Root ``u > 1`` of ``2 u exp(-u) = BIAS_EPS``: beyond ``d^2 / (2 sigma^2) >= GRAD_U`` both ``G`` and
#: ``(d^2 / sigma^2) G`` (the dsigma integrand up to ``bias_scale / sigma``) are below ``BIAS_EPS``.
GRAD_U = 20.34133451272877
_MAX_ROWS = 2**30  # cap for radii of huge sigma (the callers clamp to the grid anyway)


def gaussian_coef(sigma):
    """``-1 / (2 sigma^2)`` (float or tensor): ``-inf`` instead of ZeroDivisionError when ``sigma^2``
    underflows (the identity-neighbourhood limit, see :func:`gaussian`)."""
    return -0.5 / sigma / sigma


def gaussian(d2: torch.Tensor, coef) -> torch.Tensor:
    """``exp(coef * d2)``, exactly 1 where ``d2 == 0`` (also for ``coef = -inf``: tiny sigma gives G = 1 on
    the diagonal, 0 elsewhere)."""
    return torch.where(d2 == 0, torch.ones_like(d2), torch.exp(d2 * coef))


def _rows(sigma: float, u: float) -> int:
    """``floor(sigma * sqrt(2 u))``, capped (huge or infinite products)."""
    extent = float(sigma) * math.sqrt(2.0 * u)
    return _MAX_ROWS if not extent < _MAX_ROWS else math.floor(extent)


def band_radius(sigma: float, bias_scale: float) -> int:
    """Tight forward radius (torch backend): the smallest ``R`` (up to the rounding of ``sqrt``/``log``)
    with ``|bias_scale| * exp(-(R+1)^2 / (2 sigma^2)) < BIAS_EPS``, i.e.
    ``R = floor(sigma * sqrt(2 ln(|bias_scale| / BIAS_EPS)))``; -1 when ``|bias_scale| <= BIAS_EPS``.

    Tight because each extra band row costs the torch backend a masked key range.
    """
    ratio = abs(float(bias_scale)) / BIAS_EPS
    if ratio <= 1.0:
        return -1
    return _rows(sigma, math.log(ratio))


def band_rows(sigma: float, bias_scale: float, gh: int, *, for_grad: bool = False) -> int:
    """Padded radius (Triton backend), clamped to ``gh - 1``: ``floor(sigma * sqrt(2 u)) + 1`` with
    ``u = ln(|bias_scale| / BIAS_EPS)``; the ``+ 1`` absorbs the float rounding of the formula (key tiles are
    ``BLOCK_N`` wide anyway). -1 (no bias at all) when ``|bias_scale| < BIAS_EPS`` and not ``for_grad``.

    ``for_grad`` (sigma or bias_scale learnt): ``u = max(GRAD_U, ln(|bias_scale| / BIAS_EPS))`` so that the
    dropped terms of ``d(bias_scale)`` and ``dsigma`` are below ``BIAS_EPS`` too (never -1).
    For ``|bias_scale| > BIAS_EPS``: ``band_rows(s, b, gh) == min(band_radius(s, b) + 1, gh - 1)``.
    """
    bs = abs(float(bias_scale))
    if bs < BIAS_EPS and not for_grad:
        return -1
    u = math.log(bs / BIAS_EPS) if bs >= BIAS_EPS else 0.0
    if for_grad:
        u = max(u, GRAD_U)
    return min(_rows(sigma, u) + 1, gh - 1)


def band_rows_tensor(
    sigma: torch.Tensor, bias_scale: torch.Tensor, gh: int, *, for_grad: bool = False
) -> torch.Tensor:
    """:func:`band_rows` elementwise on device (no host sync: traceable by torch.compile), int32.

    ``sigma`` and ``bias_scale``: float tensors broadcastable to each other (``[]`` or ``[H]``).
    Non-finite results (NaN/inf sigma) get the whole grid (``gh - 1``).
    """
    s = sigma.detach().to(torch.float64)
    bs = bias_scale.detach().to(torch.float64).abs()
    u = torch.log(bs / BIAS_EPS).clamp(min=GRAD_U if for_grad else 0.0)
    rows = torch.floor(s * torch.sqrt(2.0 * u)) + 1
    rows = torch.nan_to_num(rows, nan=gh - 1, posinf=gh - 1).clamp(max=gh - 1)
    if not for_grad:
        rows = torch.where(bs < BIAS_EPS, torch.full_like(rows, -1), rows)
    return rows.to(torch.int32)
