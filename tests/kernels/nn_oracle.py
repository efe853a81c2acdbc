"""Independent float64 oracles for the ``naclip_kernels.nn`` tests: the Gaussian bias, multi-head attention
and each supported model family's transformer block, written from the papers' / libraries' formulas on the
blocks' own parameters (never through ``naclip_kernels``).

A block oracle maps the float64 input of a block to its float64 output; ``patched`` says whether that block's
attention adds ``bias_scale * G(sigma)``. ``sigma`` may be a float64 tensor ``[]`` / ``[H]`` requiring grad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_g(grid_hw: tuple[int, int], sigma, prefix: int, heads: int) -> Tensor:
    """``[H, N, N]`` float64: ``exp(-d^2 / (2 sigma_h^2))`` between patch tokens, 0 on prefix rows/cols."""
    gh, gw = grid_hw
    idx = torch.arange(gh * gw, dtype=torch.float64)
    r, c = torch.div(idx, gw, rounding_mode="floor"), torch.remainder(idx, gw)
    d2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1).expand(heads, 1, 1)
    g = torch.exp(-d2[None] / (2 * s * s))
    return F.pad(g, (prefix, 0, prefix, 0))  # zero prefix rows and columns first


def attention(
    x,
    wq,
    bq,
    wk,
    bk,
    wv,
    bv,
    wo,
    bo,
    *,
    heads,
    bias=None,
    key_key=False,
    q_norm=None,
    k_norm=None,
    inner_norm=None,
):
    """Multi-head self-attention in float64; ``bias`` ``[H, N, N]`` is added to the scaled logits."""
    b, n, _ = x.shape

    def split(w, bb):
        y = F.linear(x, w, bb)
        return y.reshape(b, n, heads, -1).permute(0, 2, 1, 3)

    q, k, v = split(wq, bq), split(wk, bk), split(wv, bv)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if key_key:
        q = k
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias[None]
    out = torch.einsum("bhij,bhjd->bhid", torch.softmax(logits, dim=-1), v)
    merged = out.permute(0, 2, 1, 3).reshape(b, n, -1)
    return F.linear(merged if inner_norm is None else inner_norm(merged), wo, bo)


def _chunks3(w: Tensor | None):
    return (None, None, None) if w is None else w.chunk(3, dim=0)


def timm_block(blk, x, *, bias, key_key):
    a = blk.attn
    (wq, wk, wv), (bq, bk, bv) = _chunks3(a.qkv.weight), _chunks3(a.qkv.bias)
    y = attention(
        blk.norm1(x),
        wq,
        bq,
        wk,
        bk,
        wv,
        bv,
        a.proj.weight,
        a.proj.bias,
        heads=a.num_heads,
        bias=bias,
        key_key=key_key,
        q_norm=a.q_norm,
        k_norm=a.k_norm,
        inner_norm=a.norm,
    )
    x = x + blk.ls1(y)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def open_clip_block(blk, x, *, bias, key_key):
    a = blk.attn
    (wq, wk, wv), (bq, bk, bv) = _chunks3(a.in_proj_weight), _chunks3(a.in_proj_bias)
    norms = {"q_norm": a.ln_q, "k_norm": a.ln_k, "inner_norm": a.ln_inner} if hasattr(a, "ln_q") else {}
    y = attention(
        blk.ln_1(x),
        wq,
        bq,
        wk,
        bk,
        wv,
        bv,
        a.out_proj.weight,
        a.out_proj.bias,
        heads=a.num_heads,
        bias=bias,
        key_key=key_key,
        **norms,
    )
    x = x + blk.ls_1(getattr(blk, "ln_attn", torch.nn.Identity())(y))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _hf_attention(a, x, *, bias, key_key, out):
    return attention(
        x,
        a.q_proj.weight,
        a.q_proj.bias,
        a.k_proj.weight,
        a.k_proj.bias,
        a.v_proj.weight,
        a.v_proj.bias,
        out.weight,
        out.bias,
        heads=a.config.num_attention_heads,
        bias=bias,
        key_key=key_key,
    )


def hf_vit_block(layer, x, *, bias, key_key):
    x = x + _hf_attention(
        layer.attention, layer.layernorm_before(x), bias=bias, key_key=key_key, out=layer.attention.o_proj
    )
    return x + layer.mlp(layer.layernorm_after(x))


def hf_clip_block(layer, x, *, bias, key_key):
    x = x + _hf_attention(
        layer.self_attn, layer.layer_norm1(x), bias=bias, key_key=key_key, out=layer.self_attn.out_proj
    )
    return x + layer.mlp(layer.layer_norm2(x))


def run_blocks(block_fn, blocks, x, *, patched, grid_hw, sigma, prefix, heads, key_key, bias_scale=1.0):
    """``x`` through ``blocks`` with ``block_fn``; blocks whose index is in ``patched`` get the bias.
    ``sigma``: one value for every block, or a dict ``block index -> sigma``."""
    for i, blk in enumerate(blocks):
        on = i in patched
        s = sigma[i] if isinstance(sigma, dict) else sigma
        g = bias_scale * gaussian_g(grid_hw, s, prefix, heads) if on else None
        x = block_fn(blk, x, bias=g, key_key=key_key and on)
    return x
