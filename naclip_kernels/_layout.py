"""Memory order of the op's output: it follows the query's, so that the head merge after it is a view.

``q`` ``[B, H, N, D]`` is *token-major* when its head stride is smaller than its token stride, as for the
views that split heads off a packed ``[B, N, 3, H, D]`` projection (timm, open_clip, HF). The output is then
stored in ``[B, N, H, D]`` order, so ``out.transpose(1, 2).reshape(B, N, H * D)`` copies nothing (the same
layout CPU SDPA returns); otherwise it is contiguous ``[B, H, N, D]``. With ``H == 1`` or ``N == 1`` both
orders coincide and the output is contiguous. Every backend and every fake (meta) implementation uses
:func:`empty_output`, so real and traced strides agree.
"""

from __future__ import annotations

import torch

__all__ = ["empty_output", "in_output_layout", "output_strides", "token_major"]


def token_major(q: torch.Tensor) -> bool:
    """Whether ``q`` ``[B, H, N, D]`` is stored token-major (head stride < token stride, ``H, N > 1``)."""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def output_strides(q: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of the ``[B, H, N, D]`` output for ``q``: dense ``[B, N, H, D]`` storage for a token-major q,
    else contiguous."""
    B, H, N, D = q.shape
    return (N * H * D, D, H * D, 1) if token_major(q) else (H * N * D, N * D, D, 1)


def empty_output(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised ``[B, H, N, D]`` output for ``q`` (its device; ``dtype`` or its dtype) with
    :func:`output_strides`."""
    dtype = q.dtype if dtype is None else dtype
    return torch.empty_strided(tuple(q.shape), output_strides(q), dtype=dtype, device=q.device)


def in_output_layout(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, H, N, D]`` with exactly :func:`output_strides` for ``q`` (no copy when it already has
    them)."""
    if tuple(out.stride()) == output_strides(q):
        return out
    return empty_output(q, out.dtype).copy_(out)
