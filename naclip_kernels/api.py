"""Public entry point :func:`gaussian_attention`: validation at the boundary, layout fix-up, backend dispatch.

The torch backend runs directly for Python-float parameters without autograd (the fast path), and through
the registered op ``naclip_kernels::torch_fwd`` (:mod:`naclip_kernels._library`) when a gradient is needed or
under ``torch.compile`` / ``torch.export``. The Triton backend is loaded lazily (``naclip_kernels.triton``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from ._checks import AttentionSpec, check_inputs, has_internal_overlap
from ._layout import in_output_layout
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


#: Module of the Triton backend (imported lazily: triton is optional).
_TRITON_MODULE = "naclip_kernels.triton"


def _load_triton() -> tuple[Any, str | None]:
    """Import the Triton plug-in lazily; return (module, None) or (None, reason)."""
    if torch.compiler.is_compiling():  # dynamo does not trace importlib; an import statement it does
        from . import triton as mod

        return mod, None
    try:
        return importlib.import_module(_TRITON_MODULE), None
    except Exception as e:  # ImportError, or a triton runtime error raised at import time
        return None, f"triton not installed/importable: {type(e).__name__}: {e}"


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> bool:
    if not torch.is_grad_enabled():
        return False
    ts = (q, k, v, spec.sigma, spec.bias_scale)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _triton_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
) -> tuple[Any, list]:
    mod, why = _load_triton()
    if mod is None:
        return None, [why]
    return mod, list(mod.unsupported_reasons(q, k, v, spec))


def _no_overlap(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Copy self-overlapping views (e.g. batch stride 1 with a unit-stride head dim): CPU SDPA reads them
    wrongly (see docs/autograd.md, "Upstream"). O(ndim) check; ``q is k`` stays one tensor."""
    fix = lambda t: t.contiguous() if has_internal_overlap(t) else t  # noqa: E731
    k2, v2 = fix(k), fix(v)
    return (k2 if q is k else fix(q)), k2, v2


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
    sigma: float | torch.Tensor | None,
    *,
    scale: float | None = None,
    num_prefix_tokens: int = 1,
    bias_scale: float | torch.Tensor = 1.0,
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
        q, k, v: ``[B, H, N, D]`` tensors (any strides, e.g. ``x.view(B, N, H, D).transpose(1, 2)``; a
            self-overlapping view is copied first), dtype float16, bfloat16, float32 or float64 (``torch``
            and ``reference`` only), all the same, same device. Scores are accumulated in float32 (float64).
        grid_hw: ``(gh, gw)`` with ``P + gh * gw == N``; may be ``None`` only when ``sigma is None``.
        sigma: Gaussian std in grid cells (> 0): a Python float, a floating tensor of shape ``[]`` or
            ``[H]`` (one per head; learnable when it requires grad), or ``None`` for plain attention. Any
            positive float is exact: tiny sigma gives the identity-neighbourhood limit (``G`` = 1 on the
            diagonal, 0 elsewhere), huge sigma ``G = 1``.
        scale: score multiplier; ``None`` means ``D ** -0.5``; an explicit ``0.0`` is honoured;
            ``|scale| <= 2^64``.
        num_prefix_tokens: ``P``, the number of tokens before the patch grid (default 1 = CLS).
        bias_scale: multiplier of ``G``: a Python float with ``|bias_scale| <= 2^64`` or a tensor ``[]`` /
            ``[H]``. NACLIP's ``nonly`` strategy, ``softmax(s * G) V``, is ``scale=0.0, bias_scale=s``.
        backend: ``"auto"`` (Triton for CUDA tensors when it supports the inputs, else ``"torch"``),
            ``"triton"``, ``"torch"``, ``"reference"``, or ``None`` for the default
            (:func:`set_default_backend`, env var ``NACLIP_ATTN_BACKEND``, else ``"auto"``).

    Autograd: differentiable w.r.t. q, k, v (``q is k``: the grads of both uses add up) and tensor-valued
    sigma / bias_scale on every backend. The torch backend saves q, k, v, the output and one log-sum-exp per
    row (never an ``N x N`` matrix) and recomputes per chunk; reductions are deterministic. It is a
    registered op (``naclip_kernels::torch_fwd``), so ``torch.compile(fullgraph=True)`` and
    ``torch.export`` work.

    Returns:
        ``[B, H, N, D]`` tensor in the input dtype, on every backend stored in q's memory order: contiguous,
        except for a token-major q (head stride < token stride, e.g. heads split off a packed
        ``[B, N, 3, H, D]`` projection), where it is stored ``[B, N, H, D]`` so that the head merge
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is a view (as CPU SDPA does). NaN inputs propagate to NaN
        outputs.

    Raises:
        TypeError / ValueError: invalid inputs (naming the argument, expected and received values); a
            non-str ``backend`` (TypeError) or an unknown backend name (ValueError); a forced backend that
            cannot take these inputs (ValueError; the message lists every reason).
    """
    spec = check_inputs(
        q, k, v, grid_hw, sigma, scale=scale, num_prefix_tokens=num_prefix_tokens, bias_scale=bias_scale
    )
    name = get_default_backend() if backend is None else _check_backend_name(backend, "backend")
    q, k, v = _no_overlap(q, k, v)

    if name == "auto":
        name = "torch"
        if spec.device.type == "cuda":
            mod, reasons = _triton_reasons(q, k, v, spec)
            if not reasons:
                return _finish(mod.triton_attention(q, k, v, spec), q, spec)

    if name == "triton":
        mod, reasons = _triton_reasons(q, k, v, spec)
        if reasons:
            raise ValueError(
                "backend='triton' cannot run these inputs "
                f"(shape {tuple(q.shape)}, {spec.dtype}, {spec.device}): " + "; ".join(reasons)
            )
        return _finish(mod.triton_attention(q, k, v, spec), q, spec)
    if name == "torch":
        if torch.compiler.is_compiling() or _needs_grad(q, k, v, spec):
            from ._library import torch_attention_op

            return torch_attention_op(q, k, v, spec)
        return _finish(torch_attention(q, k, v, spec), q, spec)
    # "reference"
    out = reference_attention(
        q,
        k,
        v,
        spec.grid_hw,
        spec.sigma,
        scale=spec.scale,
        num_prefix_tokens=spec.num_prefix_tokens,
        bias_scale=spec.bias_scale,
    )
    return in_output_layout(out, q)


def _finish(out: torch.Tensor, q: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Guarantee the output contract: ``[B, H, N, D]``, input dtype, q's memory order."""
    expected = (spec.B, spec.H, spec.N, spec.D)
    if tuple(out.shape) != expected:
        raise RuntimeError(f"internal: backend returned shape {tuple(out.shape)}, expected {expected}")
    if out.dtype != spec.dtype:
        out = out.to(spec.dtype)
    return in_output_layout(out, q)
