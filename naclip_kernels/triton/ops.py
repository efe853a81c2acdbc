"""``torch.library`` registration of the Triton path and the differentiable ``triton_attention``.

Ops ``naclip_kernels::triton_fwd`` (``-> (out, lse)``) and ``naclip_kernels::triton_bwd`` are
``torch.library.triton_op`` s launching through ``wrap_triton`` (``torch.compile`` traces into the kernels),
with shape-only fake implementations (also usable under the interpreter). ``register_autograd`` on
``triton_fwd`` gives dq, dk, dv and, for tensor ``sigma`` / ``bias_scale``, their gradients (deterministic
host-side sums of per-row partials).
"""

from typing import Any

import torch
from torch import Tensor
from torch.library import custom_op, triton_op

from .._layout import empty_output
from . import configs, launch

__all__ = ["triton_attention"]

# Under TRITON_INTERPRET=1 the kernels are Python functions that torch.compile cannot trace into: the ops are
# then opaque custom ops (same schema, fake impls, autograd), so compiled graphs call the interpreter eagerly.
_register = custom_op if configs.interpreting() else triton_op


@_register("naclip_kernels::triton_fwd", mutates_args=())
def triton_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    rows: Tensor,
    sigma: Tensor | None,
    bias_scale: Tensor | None,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    scale: float,
    sigma_value: float,
    bias_value: float,
    has_bias: bool,
    q_is_k: bool,
    store_lse: bool,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; ``sigma`` / ``bias_scale`` (tensors, or None for the Python floats ``sigma_value`` /
    ``bias_value``) enter only the backward; the forward reads the prepared ``table`` and ``rows``."""
    return launch.run_fwd(
        q, k, v, table, rows, grid_hw=(grid_h, grid_w), num_prefix=num_prefix, scale=scale,
        has_bias=has_bias, q_is_k=q_is_k, store_lse=store_lse,
    )  # fmt: skip


@_register("naclip_kernels::triton_bwd", mutates_args=())
def triton_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    table: Tensor,
    rows: Tensor,
    g_table: Tensor,
    gd2_table: Tensor,
    grid_h: int,
    grid_w: int,
    num_prefix: int,
    scale: float,
    has_bias: bool,
    bias_grad: bool,
    q_is_k: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, sum_j dS*G, sum_j dS*G*d^2)`` (the last two ``[B, H, N]`` fp32, empty unless
    ``bias_grad``)."""
    return launch.run_bwd(
        grad_out, q, k, v, out, lse, table, rows, g_table, gd2_table, grid_hw=(grid_h, grid_w),
        num_prefix=num_prefix, scale=scale, has_bias=has_bias, bias_grad=bias_grad, q_is_k=q_is_k,
    )  # fmt: skip


@triton_fwd.register_fake
def _triton_fwd_fake(q, k, v, table, rows, sigma, bias_scale, *args: Any) -> tuple[Tensor, Tensor]:
    """Shapes only: ``out`` as :func:`empty_output` makes it, ``lse`` ``[B, H, N]`` fp32 (``[0]`` unless
    ``store_lse``)."""
    B, H, N, _ = q.shape
    store_lse = args[-1]
    return empty_output(q), q.new_empty((B, H, N) if store_lse else (0,), dtype=torch.float32)


@triton_bwd.register_fake
def _triton_bwd_fake(grad_out, q, *args: Any) -> tuple[Tensor, ...]:
    B, H, N, _ = q.shape
    bias_grad = args[-2]
    sums = (B, H, N) if bias_grad else (0,)
    grads = tuple(q.new_empty(q.shape) for _ in range(3))
    return (*grads, *(q.new_empty(sums, dtype=torch.float32) for _ in range(2)))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, table, rows, sigma, bias_scale, gh, gw, P, scale, sig_f, bs_f, has_bias, q_is_k, _ = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], table, rows, sigma, bias_scale)
    ctx.static = {"grid_hw": (gh, gw), "P": P, "scale": scale, "sigma": sig_f, "bias_scale": bs_f}
    ctx.flags = (has_bias, q_is_k)


def _per_head(partial: Tensor) -> Tensor:
    """``[B, H, N]`` row sums -> ``[H]`` in float64 (a fixed-order torch reduction: deterministic)."""
    return partial.to(torch.float64).sum(dim=(0, 2))


def _to_shape(grad_h: Tensor, like: Tensor) -> Tensor:
    """Per-head gradient ``[H]`` reduced to the parameter's shape (``[]``: summed over heads)."""
    return (grad_h.sum() if like.dim() == 0 else grad_h).to(like.dtype)


def _backward(ctx: Any, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse, table, rows, sigma, bias_scale = ctx.saved_tensors
    st = ctx.static
    has_bias, q_is_k = ctx.flags
    want_sigma = sigma is not None and ctx.needs_input_grad[5]
    want_bs = bias_scale is not None and ctx.needs_input_grad[6]
    bias_grad = has_bias and (want_sigma or want_bs)
    sig = sigma if sigma is not None else st["sigma"]
    g_table, gd2_table = launch.grad_tables(st["grid_hw"], sig, q.device) if bias_grad else (table, table)
    dq, dk, dv, dsg, dsgd2 = torch.ops.naclip_kernels.triton_bwd(
        grad_out, q, k, v, out, lse, table, rows, g_table, gd2_table, *st["grid_hw"], st["P"], st["scale"],
        has_bias, bias_grad, q_is_k,
    )  # fmt: skip
    d_sigma = d_bs = None
    if want_sigma:
        if bias_grad:  # dsigma_h = bias_scale_h * sum dS G d^2 / sigma_h^3
            bs = bias_scale.detach().to(torch.float64) if bias_scale is not None else st["bias_scale"]
            d_sigma = _to_shape(bs * _per_head(dsgd2) / sigma.detach().to(torch.float64) ** 3, sigma)
        else:
            d_sigma = torch.zeros_like(sigma)
    if want_bs:
        d_bs = _to_shape(_per_head(dsg), bias_scale) if bias_grad else torch.zeros_like(bias_scale)
    return (dq, dk, dv, None, None, d_sigma, d_bs) + (None,) * 9


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def _same_view(q: Tensor, k: Tensor) -> bool:
    """``q is k``, or two views of the same memory with the same strides (eager only: no data pointers
    under tracing)."""
    if q is k:
        return True
    if torch.compiler.is_compiling():
        return False
    return q.data_ptr() == k.data_ptr() and q.stride() == k.stride() and q.dtype == k.dtype


def triton_attention(q: Tensor, k: Tensor, v: Tensor, spec: Any) -> Tensor:
    """``softmax(scale * q k^T + bias_scale * G) v`` with the fused Triton kernels, differentiable w.r.t.
    q, k, v and tensor ``spec.sigma`` / ``spec.bias_scale`` (``q is k``: the two uses' gradients are summed).

    Returns a new contiguous ``[B, H, N, D]`` tensor in the input dtype. Raises ValueError listing every
    reason from :func:`unsupported_reasons` when the kernels cannot run the inputs.
    """
    reasons = launch.unsupported_reasons(q, k, v, spec)
    if reasons:
        raise ValueError("backend='triton' cannot run these inputs: " + "; ".join(reasons))
    sigma, bias_scale = spec.sigma, spec.bias_scale
    sig_t = sigma if isinstance(sigma, Tensor) else None
    bs_t = bias_scale if isinstance(bias_scale, Tensor) else None
    params = [t for t in (sig_t, bs_t) if t is not None]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *params))
    learn_bias = grad and any(t.requires_grad for t in params)
    has_bias = sigma is not None and (bs_t is not None or float(bias_scale) != 0.0)
    device = torch.device(spec.device)
    tables = None
    if has_bias:
        tables = launch.bias_tables(spec.grid_hw, sigma, bias_scale, device, for_grad=learn_bias)
        if not params and int(tables.rows[0]) < 0:  # float |bias_scale| < eps: no bias (band bound)
            has_bias, tables = False, None
    if tables is None:
        dummy = torch.zeros((1, 1), dtype=torch.float32, device=device)
        tables = launch.BiasTables(dummy, torch.zeros((1,), dtype=torch.int32, device=device))
    gh, gw = spec.grid_hw if spec.grid_hw is not None else (1, 1)
    sig_f = float(sigma) if sigma is not None and sig_t is None else 1.0
    bs_f = float(bias_scale) if bs_t is None else 1.0
    out, _ = torch.ops.naclip_kernels.triton_fwd(
        q, k, v, tables.scaled, tables.rows, sig_t, bs_t, gh, gw, spec.num_prefix_tokens, float(spec.scale),
        sig_f, bs_f, has_bias, _same_view(q, k), grad,
    )  # fmt: skip
    return out
