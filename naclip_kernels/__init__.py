"""naclip_kernels: NACLIP's Gaussian-neighbourhood attention as one fused op.

``gaussian_attention(q, k, v, grid_hw, sigma)`` computes ``softmax(scale * Q K^T + bias_scale * G) V`` with
the 2-D Gaussian bias ``G`` of NACLIP (zero on prefix tokens) without materialising ``G`` or the score matrix;
differentiable in q, k, v and in tensor-valued (learnable, per-head) ``sigma`` / ``bias_scale``.
Backends: ``"triton"`` (fused kernel: CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (query-chunked
SDPA, O(N * chunk) extra memory), ``"reference"`` (dense fp32 oracle). See :func:`gaussian_attention`.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from ._checks import AttentionSpec, check_inputs
from .api import available_backends, gaussian_attention, get_default_backend, set_default_backend
from .reference import gaussian_bias, reference_attention, reference_attention_probs

try:
    __version__: str = _version("naclip")  # naclip_kernels ships in the naclip distribution
except _PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
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
