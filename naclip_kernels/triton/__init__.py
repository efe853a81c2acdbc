"""Fused Triton backend of :func:`naclip_kernels.gaussian_attention` (CUDA, or CPU under TRITON_INTERPRET=1).

``triton_attention(q, k, v, spec) -> Tensor``: ``[B, H, N, D]`` contiguous in q.dtype, differentiable
w.r.t. q, k, v and tensor sigma / bias_scale. ``unsupported_reasons(q, k, v, spec) -> list[str]``: [] when
the kernels can take the inputs. Kernels: ``fwd.py``, ``bwd.py``; design notes: ``docs/kernel.md``.
"""

from .launch import unsupported_reasons
from .ops import triton_attention

__all__ = ["triton_attention", "unsupported_reasons"]
