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

__all__ = ["empty_output", "in_output_layout", "token_major"]


def token_major(q: torch.Tensor) -> bool:
    """Whether ``q`` ``[B, H, N, D]`` is stored token-major (head stride < token stride, ``H, N > 1``)."""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def empty_output(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised ``[B, H, N, D]`` output for ``q`` (its device; ``dtype`` or its dtype) in the memory
    order described in the module docstring."""
    B, H, N, D = q.shape
    dtype = q.dtype if dtype is None else dtype
    if token_major(q):
        return torch.empty(B, N, H, D, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, N, D, dtype=dtype, device=q.device)


def in_output_layout(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, H, N, D]`` in :func:`empty_output`'s order for ``q``, exactly its strides (no copy when
    ``out`` already has them)."""
    B, H, N, D = q.shape
    want = (N * H * D, D, H * D, 1) if token_major(q) else (H * N * D, N * D, D, 1)
    if tuple(out.stride()) == want:
        return out
    return empty_output(q, out.dtype).copy_(out)
