"""Public entry point :func:`gaussian_attention` and backend selection."""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from ._checks import AttentionSpec, check_inputs
from .reference import reference_attention
from .torch_backend import torch_attention

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "gaussian_attention",
    "set_default_backend",
    "get_default_backend",
    "available_backends",
]

#: Names accepted by ``backend=`` / :func:`set_default_backend`.
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
#: Environment variable holding the default backend when :func:`set_default_backend` was not called.
ENV_VAR = "NACLIP_ATTN_BACKEND"

_default_backend: str | None = None  # None -> read ENV_VAR lazily, then "auto"


def _check_backend_name(name: Any, what: str) -> str:
    """``name`` normalised (stripped, lower case); TypeError for a non-str, ValueError for an unknown name."""
    expected = f"{what} must be one of {', '.join(repr(b) for b in BACKENDS)}"
    if not isinstance(name, str):
        raise TypeError(f"{expected}; got {name!r} of type {type(name).__name__}")
    if name.strip().lower() not in BACKENDS:
        raise ValueError(f"{expected}; got {name!r}")
    return name.strip().lower()


def set_default_backend(name: str | None) -> None:
    """Set the process-wide default backend used when ``gaussian_attention(..., backend=None)``.

    ``name`` is one of :data:`BACKENDS` (case-insensitive); ``None`` clears the setting, so the env var
    ``NACLIP_ATTN_BACKEND`` (read at each call) or, failing that, ``"auto"`` applies again. ``TypeError``
    for a non-str, ``ValueError`` for an unknown name.
    """
    global _default_backend
    _default_backend = None if name is None else _check_backend_name(name, "backend")


def get_default_backend() -> str:
    """The current default backend: :func:`set_default_backend`'s value, else ``$NACLIP_ATTN_BACKEND``, else
    ``"auto"``. A malformed env var raises ``ValueError`` naming it."""
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(ENV_VAR)
    if env is None or env.strip() == "":
        return "auto"
    return _check_backend_name(env, f"environment variable {ENV_VAR}")


def _load_triton() -> tuple[Any, str | None]:
    """Import the Triton plug-in lazily; return (module, None) or (None, reason)."""
    try:
        mod = importlib.import_module("naclip_kernels.triton")
    except Exception as e:  # ImportError, or a triton runtime error raised at import time
        return None, f"triton not installed/importable: {type(e).__name__}: {e}"
    return mod, None


def _triton_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[Any, list]:
    mod, why = _load_triton()
    if mod is None:
        return None, [why]
    return mod, list(mod.unsupported_reasons(q, k, v, spec))


def available_backends() -> list[str]:
    """Concrete backends usable on this machine, in preference order.

    ``"torch"`` and ``"reference"`` always; ``"triton"`` first when ``naclip_kernels.triton`` imports
    and either CUDA is available or ``TRITON_INTERPRET=1`` (the CPU interpreter) is set.
    """
    out = ["torch", "reference"]
    mod, _ = _load_triton()
    if mod is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        out.insert(0, "triton")
    return out


def gaussian_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid_hw: tuple[int, int] | None,
    sigma: float | None,
    *,
    scale: float | None = None,
    num_prefix_tokens: int = 1,
    bias_scale: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention with NACLIP's Gaussian neighbourhood bias, per batch item and head::

        O = softmax(scale * Q K^T + bias_scale * G) V

        G[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma^2))   for i, j >= P
        G[i, j] = 0                                                      if i < P or j < P

    where ``P = num_prefix_tokens`` and patch token ``t >= P`` sits at grid row ``r`` and column ``c`` with
    ``t - P = r * gw + c`` (row-major on ``grid_hw = (gh, gw)``, height first). ``G`` is un-normalised (1 on
    the diagonal) and identical for every batch item and head. Prefix tokens (CLS, registers) get zero bias,
    not ``-inf``: they still attend and are attended through ``scale * Q K^T``. The softmax runs over all
    ``N`` keys. NACLIP calls this with ``q = k`` (key-key attention; passing the same tensor object is
    supported).

    Args:
        q, k, v: ``[B, H, N, D]`` tensors (any strides, e.g. ``x.view(B, N, H, D).transpose(1, 2)``), dtype
            float16, bfloat16 or float32 (all the same), same device. Scores are accumulated in float32.
        grid_hw: ``(gh, gw)`` with ``P + gh * gw == N``; may be ``None`` only when ``sigma is None``.
        sigma: Gaussian std in grid cells (> 0), or ``None`` for plain attention (no bias).
        scale: score multiplier; ``None`` means ``D ** -0.5``; an explicit ``0.0`` is honoured.
        num_prefix_tokens: ``P``, the number of tokens before the patch grid (default 1 = CLS).
        bias_scale: multiplier of ``G``. NACLIP's ``nonly`` strategy, ``softmax(s * G) V``, is
            ``scale=0.0, bias_scale=s``.
        backend: ``"auto"`` (Triton for CUDA tensors when it supports the inputs, else ``"torch"``),
            ``"triton"``, ``"torch"``, ``"reference"``, or ``None`` for the default
            (:func:`set_default_backend`, env var ``NACLIP_ATTN_BACKEND``, else ``"auto"``).

    Returns:
        ``[B, H, N, D]`` contiguous tensor in the input dtype. NaN inputs propagate to NaN outputs.

    Raises:
        TypeError / ValueError: invalid inputs (naming the argument, expected and received values); a
            non-str ``backend`` (TypeError) or an unknown backend name (ValueError); a forced backend that
            cannot take these inputs (ValueError; the message lists every reason).
    """
    spec = check_inputs(
        q, k, v, grid_hw, sigma, scale=scale, num_prefix_tokens=num_prefix_tokens, bias_scale=bias_scale
    )
    name = get_default_backend() if backend is None else _check_backend_name(backend, "backend")

    if name == "auto":
        name = "torch"
        if spec.device.type == "cuda":
            mod, reasons = _triton_reasons(q, k, v, spec)
            if not reasons:
                return _finish(mod.triton_attention(q, k, v, spec), spec)

    if name == "triton":
        mod, reasons = _triton_reasons(q, k, v, spec)
        if reasons:
            raise ValueError(
                "backend='triton' cannot run these inputs "
                f"(shape {tuple(q.shape)}, {spec.dtype}, {spec.device}): " + "; ".join(reasons)
            )
        return _finish(mod.triton_attention(q, k, v, spec), spec)
    if name == "torch":
        return _finish(torch_attention(q, k, v, spec), spec)
    # "reference"
    return reference_attention(
        q,
        k,
        v,
        spec.grid_hw,
        spec.sigma,
        scale=spec.scale,
        num_prefix_tokens=spec.num_prefix_tokens,
        bias_scale=spec.bias_scale,
    )


def _finish(out: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Guarantee the output contract: ``[B, H, N, D]``, input dtype, contiguous."""
    expected = (spec.B, spec.H, spec.N, spec.D)
    if tuple(out.shape) != expected:
        raise RuntimeError(f"internal: backend returned shape {tuple(out.shape)}, expected {expected}")
    if out.dtype != spec.dtype:
        out = out.to(spec.dtype)
    return out.contiguous()
