"""Host side of the Triton backend: the bias tables, support checks and the kernel launches.

``unsupported_reasons(q, k, v, spec)`` lists why the kernels cannot take the inputs ([] if they can).
``run_fwd`` / ``run_bwd`` allocate outputs and launch (through ``wrap_triton``, so ``torch.compile`` sees the
kernels when they are called from the ops in :mod:`.ops`). Table layout: ``docs/kernel.md``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
import triton
from torch.library import wrap_triton

from .. import _bias
from .._layout import empty_output
from . import configs
from .bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .fwd import attn_fwd_kernel

__all__ = ["BiasTables", "bias_tables", "run_bwd", "run_fwd", "table_numel", "unsupported_reasons"]

_INT32_MAX = 2**31 - 1
_KEY = ["N_BUCKET", "HEAD_DIM", "HAS_BIAS", "Q_IS_K"]
_FWD_AUTOTUNED = configs.autotuned(attn_fwd_kernel, "fwd", _KEY)
_DKDV_AUTOTUNED = configs.autotuned(attn_bwd_dkdv_kernel, "dkdv", _KEY)
_DQ_AUTOTUNED = configs.autotuned(attn_bwd_dq_kernel, "dq", [*_KEY, "BIAS_GRAD"])


def table_numel(gh: int, gw: int) -> int:
    """Entries of one head's bias table: ``(7gh - 2) * (2gw - 1)``."""
    return (7 * gh - 2) * (2 * gw - 1)


class BiasTables:
    """Per-head fp32 tables ``[Ht, table_numel]`` for one grid, and the int32 band radius ``[Ht]``.

    ``scaled``: ``bias_scale * log2(e) * G`` over the signed offsets, 0 in the prefix band, -inf past N (the
    forward's and backward's bias). ``g`` / ``gd2``: ``G`` and ``G * d^2`` with 0 in both bands (the bias
    gradients), built only on request. Strides are 0 for a table shared by every head.
    """

    def __init__(self, scaled: torch.Tensor, rows: torch.Tensor) -> None:
        self.scaled, self.rows = scaled, rows

    @staticmethod
    def stride(t: torch.Tensor) -> int:
        return t.stride(0) if t.shape[0] > 1 else 0


def _offsets(gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dr = torch.arange(-(gh - 1), 6 * gh - 1, dtype=torch.float64, device=device)
    dc = torch.arange(-(gw - 1), gw, dtype=torch.float64, device=device)
    return dr, dc


def _gaussian_grid(gh: int, gw: int, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, d^2)``: ``[Hs, 7gh - 2, 2gw - 1]`` float64, G = 0 on the bands ``dr >= gh``; ``sigma [Hs]``."""
    dr, dc = _offsets(gh, gw, sigma.device)
    coef = _bias.gaussian_coef(sigma.detach().to(torch.float64))[:, None, None]
    gy = _bias.gaussian((dr * dr)[None, :, None], coef)
    gx = _bias.gaussian((dc * dc)[None, None, :], coef)
    g = torch.where((dr < gh)[None, :, None], gy * gx, torch.zeros((), dtype=torch.float64, device=dr.device))
    return g, (dr * dr)[:, None] + (dc * dc)[None, :]


def _scaled_table(gh: int, g: torch.Tensor, bias_scale: torch.Tensor) -> torch.Tensor:
    dr, _ = _offsets(gh, 1, g.device)
    t = (bias_scale.detach().to(torch.float64) * _bias.LOG2E)[:, None, None] * g
    t = torch.where((dr >= 4 * gh - 1)[None, :, None], float("-inf"), t)
    return t.to(torch.float32).reshape(t.shape[0], -1)


def _as_vector(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(-1)
    return torch.tensor([float(x)], dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=16)
def _cached_tables(gh: int, gw: int, sigma: float, bias_scale: float, for_grad: bool, device: torch.device):
    sig = _as_vector(sigma, device)
    scaled = _scaled_table(gh, _gaussian_grid(gh, gw, sig)[0], _as_vector(bias_scale, device))
    rows = torch.tensor([_bias.band_rows(sigma, bias_scale, gh, for_grad=for_grad)], dtype=torch.int32)
    return scaled, rows.to(device)


def bias_tables(
    grid_hw: tuple[int, int],
    sigma: float | torch.Tensor,
    bias_scale: float | torch.Tensor,
    device: torch.device,
    *,
    for_grad: bool = False,
) -> BiasTables:
    """The forward tables for ``sigma``, ``bias_scale`` (Python floats: cached per value; tensors ``[]`` /
    ``[H]``: built on device from their values, no host sync, traceable). ``for_grad``: the backward band
    radius (``_bias.band_rows(..., for_grad=True)``)."""
    gh, gw = grid_hw
    tensors = isinstance(sigma, torch.Tensor) or isinstance(bias_scale, torch.Tensor)
    if not tensors and not torch.compiler.is_compiling():
        return BiasTables(*_cached_tables(gh, gw, float(sigma), float(bias_scale), for_grad, device))
    sig, bs = _as_vector(sigma, device), _as_vector(bias_scale, device)
    scaled = _scaled_table(gh, _gaussian_grid(gh, gw, sig)[0], bs)  # [Ht, L]: broadcast of [Hs] and [Hb]
    sig, bs = torch.broadcast_tensors(sig, bs)
    return BiasTables(scaled, _bias.band_rows_tensor(sig, bs, gh, for_grad=for_grad))


def grad_tables(grid_hw: tuple[int, int], sigma: float | torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """``(G, G * d^2)`` fp32 ``[Hs, table_numel]`` (0 on both bands) for the bias gradients."""
    g, d2 = _gaussian_grid(*grid_hw, _as_vector(sigma, device))
    return g.to(torch.float32).reshape(g.shape[0], -1), (g * d2).to(torch.float32).reshape(g.shape[0], -1)


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Any) -> list[str]:
    """Every reason why these kernels cannot run ``q, k, v`` (already validated into ``spec``); [] if they
    can."""
    reasons: list[str] = []
    device = torch.device(spec.device)
    interp = configs.interpreting()
    if spec.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"the triton kernels take float16, bfloat16 or float32; got {spec.dtype}")
    if device.type == "cuda":
        if interp:
            reasons.append(
                "TRITON_INTERPRET=1 is set, so Triton runs only the CPU interpreter, not CUDA tensors"
            )
        elif torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (7, 5):
                reasons.append(f"the triton kernel needs compute capability >= 7.5; got {major}.{minor}")
            elif spec.dtype == torch.bfloat16 and major < 8:
                reasons.append(f"bfloat16 needs compute capability >= 8.0; got {major}.{minor}")
    elif device.type == "cpu":
        if not interp:
            reasons.append(
                "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
        elif spec.dtype == torch.bfloat16:
            reasons.append(
                "bfloat16 is not supported by the Triton CPU interpreter (its bf16 tl.dot is broken)"
            )
    else:
        reasons.append(f"device must be cuda (or cpu with TRITON_INTERPRET=1); got {device}")
    if spec.D > configs.MAX_HEAD_DIM:
        reasons.append(f"head dim D must be <= {configs.MAX_HEAD_DIM} for the triton kernel; got {spec.D}")
    n_programs = spec.B * spec.H * math.ceil(spec.N / 32)  # one program per (batch*head, block) on a 1-D grid
    if n_programs > _INT32_MAX:
        reasons.append(f"B*H*ceil(N/32) must be < 2^31 programs; got {n_programs}")
    for name, t in (("q", q), ("k", k), ("v", v)):  # in-tile offsets are int32
        sn, sd = abs(t.stride(2)), abs(t.stride(3))
        if sn <= _INT32_MAX and sd <= _INT32_MAX and 128 * sn + 128 * sd > _INT32_MAX:
            reasons.append(f"{name} token/feature strides {sn}/{sd} are too large for int32 in-tile offsets")
    if spec.sigma is not None and spec.grid_hw is not None:
        gh, gw = spec.grid_hw
        if table_numel(gh, gw) > 2**28:
            reasons.append(f"grid_hw={spec.grid_hw} is too large for the bias table (> 2^28 entries)")
    return reasons


def _launch(
    kernel: str, autotuned, raw, n_rows_block: str, args: tuple, meta: dict, *, dtype, n: int, bh: int, dev
):
    """Launch ``raw`` with the fixed config (interpreter, ``NACLIP_TRITON_AUTOTUNE=0``) or ``autotuned``;
    ``n_rows_block`` names the block dimension one program covers (``BLOCK_M`` or ``BLOCK_N``); the grid is
    ``(bh * cdiv(n, block),)`` with ``bh = B * H``."""
    cfg = configs.launch_config(kernel, dtype, meta["HEAD_DIM"], n, meta["HAS_BIAS"])
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        if cfg is None:
            grid = lambda m: (bh * triton.cdiv(n, m[n_rows_block]),)  # noqa: E731
            wrap_triton(autotuned)[grid](*args, **meta)
        else:
            grid = (bh * triton.cdiv(n, cfg[n_rows_block]),)
            wrap_triton(raw)[grid](
                *args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )  # fmt: skip


def _meta(q: torch.Tensor, has_bias: bool, q_is_k: bool) -> dict:
    D = q.shape[-1]
    return {
        "HEAD_DIM": D,
        "BLOCK_D": configs.block_d(D),
        "HAS_BIAS": has_bias,
        "Q_IS_K": q_is_k,
        "IEEE": q.dtype == torch.float32,
        "GATHER_BRANCH": configs.installed_gather_branch(q.dtype),
    }


def run_fwd(
    q, k, v, table, rows, *, grid_hw, num_prefix, scale, has_bias, q_is_k, store_lse
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, N, D] in q.dtype and q's memory order (:mod:`naclip_kernels._layout`), lse [B, H, N]
    fp32 or an empty tensor)``."""
    B, H, N, D = q.shape
    out = empty_output(q)
    lse = torch.empty((B, H, N) if store_lse else (0,), dtype=torch.float32, device=q.device)
    gh, gw = grid_hw
    args = (
        q, k, v, out, lse, table, rows, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        BiasTables.stride(table), BiasTables.stride(rows),
        H, N, configs.n_bucket(N), num_prefix, gh, gw, float(scale) * _bias.LOG2E,
    )  # fmt: skip
    meta = {**_meta(q, has_bias, q_is_k), "STORE_LSE": store_lse}
    _launch(
        "fwd",
        _FWD_AUTOTUNED,
        attn_fwd_kernel,
        "BLOCK_M",
        args,
        meta,
        dtype=q.dtype,
        n=N,
        bh=B * H,
        dev=q.device,
    )
    return out, lse


def run_bwd(
    do, q, k, v, out, lse, table, rows, g_table, gd2_table, *, grid_hw, num_prefix, scale, has_bias,
    bias_grad, q_is_k,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``(dq, dk, dv, dsg, dsgd2)``: contiguous ``[B, H, N, D]`` gradients in q.dtype and the fp32
    ``[B, H, N]`` row sums ``sum_j dS * G``, ``sum_j dS * G * d^2`` (empty unless ``bias_grad``)."""
    B, H, N, D = q.shape
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    pre_block = 32 if configs.interpreting() else 64
    pre = (out, do, delta, *out.stride(), *do.stride(), H, N)
    pre_grid = (B * H * triton.cdiv(N, pre_block),)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        wrap_triton(attn_bwd_preprocess_kernel)[pre_grid](
            *pre, HEAD_DIM=D, BLOCK_M=pre_block, BLOCK_D=configs.block_d(D)
        )
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=dev) for _ in range(3))
    sums = (B, H, N) if bias_grad else (0,)
    dsg, dsgd2 = (torch.empty(sums, dtype=torch.float32, device=dev) for _ in range(2))
    gh, gw = grid_hw
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    scalars = (H, N, configs.n_bucket(N), num_prefix, gh, gw, float(scale) * _bias.LOG2E, float(scale))
    t_strides = (BiasTables.stride(table), BiasTables.stride(rows))
    meta = _meta(q, has_bias, q_is_k)
    dkdv_args = (q, k, v, do, dk, dv, lse, delta, table, rows, *strides, *t_strides, *scalars)
    _launch(
        "dkdv",
        _DKDV_AUTOTUNED,
        attn_bwd_dkdv_kernel,
        "BLOCK_N",
        dkdv_args,
        meta,
        dtype=q.dtype,
        n=N,
        bh=B * H,
        dev=dev,
    )
    dq_args = (
        q, k, v, do, dq, lse, delta, table, rows, g_table, gd2_table, dsg, dsgd2, *strides, *t_strides,
        BiasTables.stride(g_table), *scalars,
    )  # fmt: skip
    dq_meta = {**meta, "BIAS_GRAD": bias_grad}
    _launch(
        "dq",
        _DQ_AUTOTUNED,
        attn_bwd_dq_kernel,
        "BLOCK_M",
        dq_args,
        dq_meta,
        dtype=q.dtype,
        n=N,
        bh=B * H,
        dev=dev,
    )
    return dq, dk, dv, dsg, dsgd2
