"""The output memory order the op promises (``naclip_kernels._layout``), restated independently."""

from __future__ import annotations

import torch


def in_q_order(out: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether ``out`` has the dense strides of q's order: ``[B, N, H, D]`` storage when q's head stride is
    below its token stride (H, N > 1), else contiguous ``[B, H, N, D]``."""
    B, H, N, D = q.shape
    token_major = H > 1 and N > 1 and q.stride(1) < q.stride(2)
    return out.stride() == ((N * H * D, D, H * D, 1) if token_major else (H * N * D, N * D, D, 1))
