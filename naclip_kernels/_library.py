"""torch.library registration of the torch backend: ops ``naclip_kernels::torch_fwd`` and ``::torch_bwd``.

``torch_fwd(q, k, v, sigma, bias_scale, ...) -> (out, lse)`` and its backward are opaque custom ops with fake
(meta) implementations and an autograd formula, so ``torch.compile(fullgraph=True)``, ``torch.export`` and
``torch.library.opcheck`` see one node per call. ``sigma`` / ``bias_scale`` travel either as tensors (``[]``
or ``[H]``, learnable) or as Python floats (``sigma_value`` / ``bias_scale_value``). ``lse`` is the per-row
log-sum-exp ``[B, H, N]`` (float32; float64 for float64 inputs) saved for backward, never an N x N matrix; it
is not differentiable. Only :func:`torch_attention_op` is meant to be called (by :mod:`naclip_kernels.api`).
"""

from __future__ import annotations

import torch

from ._checks import AttentionSpec
from ._layout import empty_output
from .torch_backend import torch_attention
from .torch_backward import torch_backward

__all__ = ["torch_attention_op"]

Tensor = torch.Tensor


def _spec(q, sigma, bias_scale, grid_hw, sigma_value, bias_scale_value, scale, num_prefix_tokens):
    B, H, N, D = q.shape
    return AttentionSpec(
        B=B,
        H=H,
        N=N,
        D=D,
        grid_hw=None if grid_hw is None else (int(grid_hw[0]), int(grid_hw[1])),
        sigma=sigma if sigma is not None else sigma_value,
        scale=scale,
        num_prefix_tokens=num_prefix_tokens,
        bias_scale=bias_scale if bias_scale is not None else bias_scale_value,
        dtype=q.dtype,
        device=q.device,
    )


@torch.library.custom_op("naclip_kernels::torch_fwd", mutates_args=())
def torch_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sigma: Tensor | None,
    bias_scale: Tensor | None,
    grid_hw: list[int] | None,
    sigma_value: float | None,
    bias_scale_value: float,
    scale: float,
    num_prefix_tokens: int,
) -> tuple[Tensor, Tensor]:
    """Forward of the torch backend: ``(out [B, H, N, D], lse [B, H, N])``; ``out``'s memory order follows
    q's (:mod:`naclip_kernels._layout`)."""
    spec = _spec(q, sigma, bias_scale, grid_hw, sigma_value, bias_scale_value, scale, num_prefix_tokens)
    return torch_attention(q, k, v, spec, with_lse=True)


@torch_fwd.register_fake
def _(q, k, v, sigma, bias_scale, grid_hw, sigma_value, bias_scale_value, scale, num_prefix_tokens):
    B, H, N, _ = q.shape
    out = empty_output(q)
    lse = q.new_empty(B, H, N, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.custom_op("naclip_kernels::torch_bwd", mutates_args=())
def torch_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    sigma: Tensor | None,
    bias_scale: Tensor | None,
    grid_hw: list[int] | None,
    sigma_value: float | None,
    bias_scale_value: float,
    scale: float,
    num_prefix_tokens: int,
    need_sigma: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, d_sigma, d_bias_scale)``; a parameter grad not requested is an empty ``[0]`` tensor,
    a requested one has its parameter's shape and dtype."""
    spec = _spec(q, sigma, bias_scale, grid_hw, sigma_value, bias_scale_value, scale, num_prefix_tokens)
    dq, dk, dv, (d_sig, d_bs) = torch_backward(
        dout, q, k, v, out, lse, spec, need_sigma=need_sigma, need_bias=need_bias
    )
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()  # the fake impl's layout
    return dq, dk, dv, _param_grad(d_sig, sigma, need_sigma, q), _param_grad(d_bs, bias_scale, need_bias, q)


def _param_grad(per_head: Tensor | None, param: Tensor | None, need: bool, q: Tensor) -> Tensor:
    """Per-head grad ``[H]`` reduced to the parameter's shape (``[]``: sum over heads) and dtype."""
    if not need or param is None:
        return q.new_empty(0)
    if per_head is None:  # no bias term at all (sigma None or bias_scale 0): the gradient is zero
        return torch.zeros_like(param)
    g = per_head.sum() if param.dim() == 0 else per_head
    return g.to(param.dtype)


@torch_bwd.register_fake
def _(dout, q, k, v, out, lse, sigma, bias_scale, grid_hw, sv, bv, scale, P, need_sigma, need_bias):
    def pg(param, need):
        return torch.empty_like(param) if need and param is not None else q.new_empty(0)

    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        pg(sigma, need_sigma),
        pg(bias_scale, need_bias),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, sigma, bias_scale, grid_hw, sigma_value, bias_scale_value, scale, P = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, sigma, bias_scale)
    ctx.args = (grid_hw, sigma_value, bias_scale_value, scale, P)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, sigma, bias_scale = ctx.saved_tensors
    need_sigma = sigma is not None and ctx.needs_input_grad[3]
    need_bias = bias_scale is not None and ctx.needs_input_grad[4]
    dq, dk, dv, d_sig, d_bs = torch.ops.naclip_kernels.torch_bwd(
        dout, q, k, v, out, lse, sigma, bias_scale, *ctx.args, need_sigma, need_bias
    )
    return (
        dq,
        dk,
        dv,
        d_sig if need_sigma else None,
        d_bs if need_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


torch_fwd.register_autograd(_backward, setup_context=_setup_context)


def torch_attention_op(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
    """The torch backend through the registered op (differentiable, compilable). ``spec`` is validated."""
    sig, bs = spec.sigma, spec.bias_scale
    out, _ = torch.ops.naclip_kernels.torch_fwd(
        q,
        k,
        v,
        sig if isinstance(sig, torch.Tensor) else None,
        bs if isinstance(bs, torch.Tensor) else None,
        None if spec.grid_hw is None else list(spec.grid_hw),
        None if isinstance(sig, torch.Tensor) else sig,
        0.0 if isinstance(bs, torch.Tensor) else bs,
        spec.scale,
        spec.num_prefix_tokens,
    )
    return out
