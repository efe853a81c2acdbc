"""Reference (oracle) implementation: the closed-form Gaussian bias and dense, fp32 attention.

These functions materialise the ``N x N`` bias and score matrices. They are the correctness oracle for the
memory-efficient backends and are meant for small N (tests, fixtures, debugging), not for production sizes.
"""

from __future__ import annotations

import torch

from ._bias import gaussian, gaussian_coef
from ._checks import AttentionSpec, check_grid, check_inputs, check_prefix, check_sigma

__all__ = ["gaussian_bias", "reference_attention", "reference_attention_probs", "gaussian_factors"]


def gaussian_factors(
    n: int, sigma: float, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """1-D Gaussian factor table ``g[a, b] = exp(-(a - b)^2 / (2 sigma^2))`` for ``a, b in [0, n)``.

    Computed in float64 with :func:`naclip_kernels._bias.gaussian` (exact for every sigma > 0: tiny sigma
    gives the limit ``g = [a == b]`` instead of NaN / ZeroDivisionError) and rounded once to ``dtype``. ``G``
    on a grid is the separable product ``G[(r1, c1), (r2, c2)] = gy[r1, r2] * gx[c1, c2]`` of two tables.
    """
    idx = torch.arange(n, dtype=torch.float64, device=device)
    d = idx[:, None] - idx[None, :]
    return gaussian(d * d, gaussian_coef(float(sigma))).to(dtype)


def _factors_t(n: int, sigma: torch.Tensor) -> torch.Tensor:
    """Differentiable ``[h, n, n]`` factor tables for a 1-D sigma tensor ``[h]`` (same formula)."""
    idx = torch.arange(n, dtype=sigma.dtype, device=sigma.device)
    d = idx[:, None] - idx[None, :]
    return gaussian((d * d)[None], gaussian_coef(sigma)[:, None, None])


def gaussian_bias(
    grid_hw: tuple[int, int],
    sigma: float,
    *,
    num_prefix_tokens: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """NACLIP's Gaussian attention addition ``G`` as a dense ``[N, N]`` tensor, ``N = P + gh * gw``.

    ``G[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma^2))`` for patch tokens ``i, j >= P`` where ``t
    - P = r * gw + c`` (row-major on ``grid_hw = (gh, gw)``; ``r`` is the image row); ``G = 0`` on every row
    and column of a prefix token (``t < P``: CLS, registers). Un-normalised (diagonal = 1), truncated at the
    grid border. ``sigma`` is in grid cells. Closed form, O(N^2) work and memory (the official conv
    construction is O(N^3)); equals the official ``get_attention_addition`` to ~2e-7 in float32.

    Args:
        grid_hw: ``(gh, gw)`` ints >= 1 (height first).
        sigma: finite number > 0.
        num_prefix_tokens: ``P >= 0`` zero rows/columns placed first.
        dtype: floating dtype of the result (computed in float32, or float64 when ``dtype=torch.float64``).
        device: device of the result.
    """
    gh, gw = check_grid(grid_hw)
    s = check_sigma(sigma)
    P = check_prefix(num_prefix_tokens)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    gy = gaussian_factors(gh, s, dtype=work, device=device)
    gx = gaussian_factors(gw, s, dtype=work, device=device)
    n = gh * gw
    out = torch.zeros(P + n, P + n, dtype=work, device=device)
    # patch block [gh, gw, gh, gw] = gy[r1, r2] * gx[c1, c2]
    out[P:, P:].view(gh, gw, gh, gw).copy_(gy[:, None, :, None] * gx[None, :, None, :])
    return out.to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_bias(spec: AttentionSpec, work: torch.dtype) -> torch.Tensor:
    """``bias_scale * G`` as ``[h, N, N]`` in ``work`` (h = 1, or H for per-head tensors); differentiable in
    tensor-valued ``sigma`` / ``bias_scale``."""
    gh, gw = spec.grid_hw  # type: ignore[misc]
    P, dev = spec.num_prefix_tokens, spec.device
    if isinstance(spec.sigma, torch.Tensor):
        sig = spec.sigma.to(work).reshape(-1)
        gy, gx = _factors_t(gh, sig), _factors_t(gw, sig)
        patch = (gy[:, :, None, :, None] * gx[:, None, :, None, :]).reshape(-1, gh * gw, gh * gw)
        g = torch.nn.functional.pad(patch, (P, 0, P, 0))
    else:
        g = gaussian_bias(spec.grid_hw, spec.sigma, num_prefix_tokens=P, dtype=work, device=dev)[None]
    bs = spec.bias_scale
    if isinstance(bs, torch.Tensor):
        return g * bs.to(work).reshape(-1, 1, 1)
    return g * bs


def _scores(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    work = _work_dtype(q.dtype)
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * spec.scale
    if spec.has_bias:
        s = s + _dense_bias(spec, work)
    return s


def reference_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    grid_hw: tuple[int, int] | None,
    sigma: float | torch.Tensor | None,
    *,
    scale: float | None = None,
    num_prefix_tokens: int = 1,
    bias_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Softmax matrix ``A = softmax(scale * Q K^T + bias_scale * G)`` as float32 ``[B, H, N, N]`` (float64 for
    float64 inputs).

    Rows are queries. Same arguments and validation as :func:`reference_attention` (minus ``v``).
    Materialises ``B*H*N*N`` floats: for small N (fixtures, debugging) only.
    """
    spec = check_inputs(
        q, k, k, grid_hw, sigma, scale=scale, num_prefix_tokens=num_prefix_tokens, bias_scale=bias_scale
    )
    return torch.softmax(_scores(q, k, spec), dim=-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid_hw: tuple[int, int] | None,
    sigma: float | torch.Tensor | None,
    *,
    scale: float | None = None,
    num_prefix_tokens: int = 1,
    bias_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Dense oracle of :func:`naclip_kernels.gaussian_attention`: ``softmax(scale*Q K^T + bias_scale*G) V``.

    q, k, v: ``[B, H, N, D]`` (any strides), float16/bfloat16/float32/float64, same dtype and device. All
    arithmetic in float32 (float64 for float64 inputs) with the bias materialised densely; the result is cast
    to the input dtype, shape ``[B, H, N, D]``, contiguous. ``scale=None`` means ``D ** -0.5``; ``sigma=None``
    means no bias. Prefix tokens (the first ``num_prefix_tokens``) get zero bias as queries and as keys.
    ``sigma`` / ``bias_scale`` may be tensors ``[]`` or ``[H]`` (per head). Plain torch ops throughout, so the
    result is differentiable w.r.t. q, k, v and tensor-valued sigma / bias_scale (the autograd oracle).
    """
    spec = check_inputs(
        q, k, v, grid_hw, sigma, scale=scale, num_prefix_tokens=num_prefix_tokens, bias_scale=bias_scale
    )
    p = torch.softmax(_scores(q, k, spec), dim=-1)
    return torch.matmul(p, v.to(p.dtype)).to(spec.dtype).contiguous()
