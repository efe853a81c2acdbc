"""naclip_kernels: NACLIP's Gaussian-neighbourhood attention as one fused op.

``gaussian_attention(q, k, v, grid_hw, sigma)`` computes ``softmax(scale * Q K^T + bias_scale * G) V`` with
the 2-D Gaussian bias ``G`` of NACLIP (zero on prefix tokens) without materialising ``G`` or the score matrix.
Backends: ``"triton"`` (fused kernel: CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (query-chunked
SDPA, O(N * chunk) extra memory), ``"reference"`` (dense fp32 oracle). See :func:`gaussian_attention`.
"""

from ._checks import AttentionSpec, check_inputs
from .api import available_backends, gaussian_attention, get_default_backend, set_default_backend
from .reference import gaussian_bias, reference_attention, reference_attention_probs

__all__ = [
    "AttentionSpec",
    "available_backends",
    "check_inputs",
    "gaussian_attention",
    "gaussian_bias",
    "get_default_backend",
    "reference_attention",
    "reference_attention_probs",
    "set_default_backend",
]
