"""Fused Triton forward kernel for NACLIP's Gaussian-neighbourhood attention.

Computes, per (batch item, head)::

    O = softmax(scale * Q K^T + bias_scale * G) V

``q, k, v``: ``[B, H, N, D]`` float16 / bfloat16 / float32 with arbitrary strides (views of a ``[B, N, H, D]``
tensor, batch expanded with stride 0, ``q is k``); output: a new contiguous ``[B, H, N, D]`` tensor in the
input dtype. ``G[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma^2))`` for patch tokens
``i, j >= P`` (``t - P = r * gw + c``, row-major on ``grid_hw = (gh, gw)``), and ``G = 0`` on every row and
column of a prefix token ``t < P`` (CLS, registers: 0, not -inf). ``sigma=None`` means no bias.

Plug-in interface used by :mod:`naclip_kernels.api`::

    unsupported_reasons(q, k, v, spec) -> list[str]   # [] when this kernel can take the inputs
    triton_attention(q, k, v, spec) -> Tensor          # spec: naclip_kernels._checks.AttentionSpec

Hooks for the static resource report (:mod:`naclip_kernels.inspect`): ``CONFIGS`` (autotune list),
:func:`config_allowed` (the autotuner's pruning rule, also used by the report to compile exactly the configs
that can launch), ``_attn_fwd_kernel`` (the raw ``@triton.jit`` function), :func:`aot_signature` and
:func:`aot_attrs`.

Design
------
* Flash-attention forward (one program per (batch*head, query block), 1-D launch grid so that neither
  ``B*H`` nor the number of query blocks meets the 65535 limit of grid axes 1/2; query blocks of one head are
  adjacent in launch order so they share K/V in L2). Online softmax in fp32 with ``exp2``: ``log2(e)`` is
  folded into ``qk_scale = scale * log2(e)`` and into the bias table, so the logits live in log2 units and
  each score element costs exactly one ``MUFU.EX2``. The running max is taken on the final (scaled + biased)
  logits, so any sign of ``scale`` / ``bias_scale`` is safe. fp32 accumulation; fp32 inputs use
  ``tl.dot(..., input_precision="ieee")`` (no TF32), so they match the fp32 reference to ~1e-6.
* Strides are kernel arguments; batch/head and tile-start offsets are formed in int64 (``B*H*N*D`` may exceed
  2^31), offsets inside a tile stay int32 (guarded by :func:`unsupported_reasons`). ``Q_IS_K`` (constexpr):
  the query tile is read through the K pointer/strides, i.e. ``q`` is never a separate stream when ``q is k``.
* Head dims 1..128; a non-power-of-two ``D`` (48, 80, 96) is padded to ``BLOCK_D = next_pow2(max(D, 16))``
  with masked loads (zeros in the padding do not change the dot products) and a masked store.
  Full key tiles are loaded without a row mask; only the last partial tile (``N % BLOCK_N``) is masked
  (its invalid columns get -inf logits).

The Gaussian costs no exponential (the key static claim: ``MUFU.EX2`` count with bias == without bias):

1. **Table gather instead of exp.** The host builds (per call, cached) one fp32 table
   ``T[dr + gh - 1, dc + gw - 1] = bias_scale * log2(e) * gy(dr) * gx(dc)`` for signed offsets
   ``dr in [-(gh-1), 6gh-2]``, ``dc in [-(gw-1), gw-1]``, with ``gy(dr) = exp(-dr^2 / (2 sigma^2))`` for
   ``|dr| < gh``, a **zero band** for ``gh <= dr <= 4gh-2`` and a **-inf band** for ``dr >= 4gh-1``.
   Because the index is linear in the coordinates, ``idx(i, j) = a_i - b_j`` with
   ``a_i = (r_i + gh - 1) * (2gw - 1) + c_i + gw - 1`` and ``b_j = r_j * (2gw - 1) + c_j``: the per-element
   work is one integer subtract, one address computation, one L1-resident gather and one add to the scaled
   logit.
   ``a`` (``[BLOCK_M]``, once per program) and ``b`` (``[BLOCK_N]``, once per key tile) need the only integer
   div/mod, on 1-D vectors. Prefix and out-of-range queries get the virtual row ``2gh - 1``, prefix keys
   ``1 - 2gh`` (offsets fall in the zero band for every partner: ``G = 0`` on prefix rows/columns without a
   mask) and keys ``>= N`` the row ``1 - 4gh`` (the -inf band: the tail tile's padding columns are masked by
   the same gather). Table size ``(7gh - 2) * (2gw - 1) * 4`` bytes (10 KB for 14x14, 0.9 MB for 128x128);
   one tile touches only a few table rows (a query block spans ``ceil(BLOCK_M / gw) + 1`` grid rows), so it
   stays in L1.
   For fp16/bf16 on triton >= 3.7 the gather sits in an always-taken runtime branch (``GATHER_BRANCH``, see
   "Version-specific branch" below): otherwise Triton's software pipeliner stages it through shared memory
   with ``cp.async`` (two LSU operations per element and a [BLOCK_M, BLOCK_N] fp32 buffer per extra stage).
   It is loaded in a blocked layout and converted to the MMA layout (through shared memory), which is the
   remaining per-element cost of the bias on near tiles.
2. **Band skip.** Key tiles whose grid rows are all more than ``R`` rows away from every query row of the
   program get no bias at all (no index math, no gather). With row-major tokens the near tiles are one
   contiguous token range, so the key loop is split into far / near / far ranges (+ the masked tail tile,
   which always takes the bias path) with no per-element branching. Both loop bodies are shared with the
   bias-free kernel's two (full tiles, masked tail), so the static ``MUFU.EX2`` count is identical with and
   without the bias (checked with ``cuobjdump -sass`` for every config, sm_90 fp16/bf16 D=64).

   *Bound.* For a pair with ``|r_i - r_j| > R``: ``|bias_scale| * G_ij <= |bias_scale| * exp(-(R+1)^2 / (2
   sigma^2)) < eps`` with ``R = floor(sigma * sqrt(2 ln(|bias_scale| / eps)))`` and ``eps = 2^-24``
   (natural-log logit units). Dropping additive terms ``delta_j`` with ``|delta_j| < eps`` from the logits of
   one softmax row multiplies every probability by a factor in ``[e^-2eps, e^2eps]`` (the numerator changes
   by ``e^delta_j``, the denominator by a convex combination of those), so
   ``|O' - O| <= (e^(2 eps) - 1) * max_j |v_j| ~ 1.2e-7 * max|v|`` -- below the fp32 rounding of the
   logits themselves (``ulp(1) = 1.2e-7``), i.e. exact to within fp32 resolution. The skip holds for any
   ``sigma`` (at ``sigma = 50`` and grids < 290 rows nothing is skipped; at ``sigma = 5``, ``R = 28``).
   If ``|bias_scale| < eps`` the bias is dropped entirely by the same bound.

Autotune: :data:`CONFIGS` (pruned per call by :func:`config_allowed`: shared-memory size, dtype, N, head dim
and the register budget of the bias gather, see below) keyed on
``(N_BUCKET, HEAD_DIM, HAS_BIAS, Q_IS_K, dtypes)`` on a GPU; under ``TRITON_INTERPRET=1`` a fixed
:data:`INTERPRETER_CONFIG` (autotune needs a GPU driver). ``NACLIP_TRITON_AUTOTUNE=0`` replaces autotuning
by a fixed heuristic config on a GPU too (quick test runs). Only Triton API common to 3.6-3.8 is used.

*Version-specific branch* (``GATHER_BRANCH``, a constexpr chosen on the host by :func:`_use_gather_branch`
from the dtype and ``triton.__version__``, and used alike by :func:`triton_attention`, the autotune pruning
:func:`config_allowed`, :func:`heuristic_config` and :func:`aot_signature`, i.e. by ``python -m
naclip_kernels.inspect``; fixed per dtype in a process, so the autotune key needs no extra entry): True only
for fp16/bf16 with triton >= 3.7, because the runtime branch around the gather meets the compiler's layout
passes differently per version. On triton 3.8.0 (measured, sm_80/sm_90) the branch keeps the pipeliner off
the gather at no cost (``MUFU.EX2`` with bias / without = 1.000). On triton 3.6.0 (measured) the same branch
makes the layout-cleanup pass duplicate the softmax chain of the near-tile loop: 1.5x the ``MUFU.EX2`` count
of the bias-free kernel and up to 255 registers (spills: sm_80 128x64 8 B, sm_90 64x64 x 3 stages 24 B).
Without the branch 3.6.0 keeps one softmax (ratio 1.000) and pays in shared memory instead: the pipelined
gather is staged by ``cp.async`` in ``num_stages - 1`` fp32 ``[BLOCK_M, BLOCK_N]`` buffers (sm_90, 128x64 x 3
stages, D=64: 132096 B instead of 70656 B), which :func:`config_allowed` adds to its estimate whenever the
branch is off (this prunes 128x64 x 3 stages at D=128 with the bias). Registers of the branch-free kernel
on 3.6.0 with the bias (fp16/bf16, the configs that launch): D=64 spill-free, sm_80 139-255 (64x64 x 3
stages at 255), sm_90 172-239; D=128 the 64x64 configs spill more than on 3.8 (sm_80 96/128 B, sm_90
280/256 B at 2/3 stages, vs 16/64 and 32/32 B on 3.8; D=128 spills are reported, not gated, by the static
check). 3.7 was not measured; it gets the branch as the first release after the measured 3.6 behaviour. An
unparsable version gets no branch (correct and EX2-clean on both measured versions, only more shared
memory). fp32 (FMA dots) never takes the branch: there it duplicates the softmax (1.5x EX2) on 3.8 as well.

*Register budget of the bias gather* (fp16/bf16, measured with ``python -m naclip_kernels.inspect``,
triton 3.8, sm_80 and sm_90). The gathered tile costs about three registers per score element and thread on
top of the score tile and the accumulator: the fp32 bias value plus its 64-bit address, live together with
the scaled scores while the gathered tile is converted to the MMA layout. With 64 score elements per thread
(``BLOCK_M * BLOCK_N / (32 * num_warps)``: 128x64 and 64x128 at 4 warps, 128x128 at 8 warps) every such
config hits ptxas' 255-register cap and spills 64-384 B/thread with the bias on (also at 2 stages); the
listed configs with 32 or fewer compile spill-free (64x64 at 4 warps, 2 stages, reaches 255 registers on
sm_80 with no spill: the margin there is thin). :func:`config_allowed` therefore launches a bias config
only if it has at most :data:`BIAS_MAX_SCORES_PER_THREAD` score elements per thread; the larger configs stay
in the list for the bias-free kernel (where they do not spill). Not every 32-element config is safe
(64x128 at 8 warps spills 8 B on sm_90 with the bias), so the list holds only configs the static check has
verified. 128x32 at 4 warps spilled 8 B on sm_80 even without bias and was replaced by 128x32 at 8 warps.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import torch

from ._bias import BIAS_EPS as BIAS_EPS  # re-exported (tests)
from ._bias import LOG2E as _LOG2E
from ._bias import band_rows, gaussian, gaussian_coef

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - triton missing (e.g. macOS)
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [
    "CONFIGS",
    "INTERPRETER_CONFIG",
    "MAX_HEAD_DIM",
    "AOT_EXAMPLE",
    "aot_attrs",
    "aot_example_args",
    "aot_signature",
    "band_rows",
    "bias_table",
    "config_allowed",
    "heuristic_config",
    "triton_attention",
    "unsupported_reasons",
]

#: Largest supported head dim.
MAX_HEAD_DIM = 128
_INT32_MAX = 2**31 - 1

#: Autotune configurations (also compiled one by one by ``naclip_kernels.inspect``).
CONFIGS: list[dict[str, int]] = [
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
]
#: The single configuration used under ``TRITON_INTERPRET=1`` (small blocks: several query and key tiles at
#: the interpreter's test sizes, so masking, the band split and the tail tile are all exercised).
INTERPRETER_CONFIG: dict[str, int] = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}

# Shared memory assumed available when pruning configs (the sm_80 limit, 163 KB, minus a margin).
_SMEM_BUDGET = 160 * 1024
#: With the bias on, configs with more score elements per thread than this spill (see the module docstring).
BIAS_MAX_SCORES_PER_THREAD = 32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: ``triton.__version__`` of the installed triton ("" when triton is missing); read by :func:`_gather_branch`.
_TRITON_VERSION: str = str(getattr(triton, "__version__", "") or "")
#: First triton release (major, minor) whose layout passes keep the softmax single with the gather branch.
_GATHER_BRANCH_MIN_VERSION = (3, 7)
_VERSION_RE = re.compile(r"\s*v?(\d+)(?:\.(\d+))?")


def _parse_version(version: object) -> tuple[int, int] | None:
    """``(major, minor)`` from a version string (``"3.8.0"``, ``"3.7.0+git1a2b3c"``, ``"3.10.0rc1"``,
    ``"3"`` -> (3, 0)); None when it does not start with a number (or is not a string)."""
    if not isinstance(version, str):
        return None
    m = _VERSION_RE.match(version)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def _use_gather_branch(dtype: torch.dtype, version: object) -> bool:
    """Whether the kernel gathers the bias inside the runtime branch (``GATHER_BRANCH``), for q/k/v
    ``dtype`` and triton version string ``version``.

    True only for float16/bfloat16 on triton >= 3.7 (see the module docstring, "Version-specific branch").
    float32 never (the branch duplicates the softmax of the FMA-dot kernel), nor an
    unparsable version (the branch-free kernel is correct and EX2-clean on every version; it only costs
    shared memory, which :func:`config_allowed` accounts for).
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    parsed = _parse_version(version)
    return parsed is not None and parsed >= _GATHER_BRANCH_MIN_VERSION


def _gather_branch(dtype: torch.dtype) -> bool:
    """:func:`_use_gather_branch` for the installed triton."""
    return _use_gather_branch(dtype, _TRITON_VERSION)


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def _n_bucket(n: int) -> int:
    """Autotune bucket for N: the next power of two, clamped to [64, 16384]."""
    return min(16384, max(64, 1 << (int(n) - 1).bit_length()))


# --------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_bias(s, offs_n, N, P, GH, GW, T, a_q, GATHER_BRANCH: tl.constexpr):
        """s + T[a_i - b_j]: the Gaussian bias (log2 units) gathered from the table, no exponential."""
        # Key-side table coordinate b_j = r_j * (2gw - 1) + c_j. Prefix keys get the virtual row 1 - 2gh
        # (their offsets to every query fall in the table's zero band), keys >= N the row 1 - 4gh (-inf band).
        tk = offs_n - P
        k_patch = (tk >= 0) & (offs_n < N)
        tk = tl.where(k_patch, tk, 0)
        rk = tk // GW
        ck = tk - rk * GW
        rk = tl.where(k_patch, rk, tl.where(offs_n < N, 1 - 2 * GH, 1 - 4 * GH))
        ck = tl.where(k_patch, ck, 0)
        b_k = rk * (2 * GW - 1) + ck
        if GATHER_BRANCH:
            # The gather sits in an (always taken) runtime branch so that the software pipeliner leaves it
            # alone: a pipelined gather is staged through shared memory by cp.async (2 LSU ops per element).
            # Host-chosen (see _use_gather_branch): off for fp32 and for triton < 3.7.
            if N > 0:  # noqa: SIM108 (a runtime branch, not a ternary, on purpose)
                bias = tl.load(T + (a_q[:, None] - b_k[None, :]))
            else:
                bias = tl.zeros(s.shape, dtype=tl.float32)
        else:
            bias = tl.load(T + (a_q[:, None] - b_k[None, :]))
        return s + bias

    @triton.jit
    def _attn_tile(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        kv_off_k,
        kv_off_v,
        start_n,
        stride_kn,
        stride_vn,
        offs_n0,
        d_mask,
        N,
        P,
        GH,
        GW,
        qk_scale,
        T,
        a_q,
        BLOCK_N: tl.constexpr,
        PAD_D: tl.constexpr,
        APPLY_BIAS: tl.constexpr,
        MASK_N: tl.constexpr,
        IEEE: tl.constexpr,
        GATHER_BRANCH: tl.constexpr,
    ):
        """One key/value tile of the online softmax; returns the updated (acc, l_i, m_i)."""
        offs_n = start_n + offs_n0
        start64 = tl.cast(start_n, tl.int64)
        k_ptrs = k_base + start64 * stride_kn + kv_off_k
        v_ptrs = v_base + start64 * stride_vn + kv_off_v
        if MASK_N:
            kv_mask = (offs_n < N)[:, None] & d_mask[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif PAD_D:
            k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if IEEE:  # noqa: SIM108
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if APPLY_BIAS:
            s = _add_bias(s, offs_n, N, P, GH, GW, T, a_q, GATHER_BRANCH)
        elif MASK_N:
            s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        if MASK_N:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif PAD_D:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if IEEE:  # noqa: SIM108
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + tl.sum(p, 1)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        T,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        H,
        N,
        N_BUCKET,
        P,
        GH,
        GW,
        BAND_R,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        Q_IS_K: tl.constexpr,
        IEEE: tl.constexpr,
        GATHER_BRANCH: tl.constexpr,
    ):
        """O[b, h] = softmax(qk_scale * Q K^T + T-gathered bias) V in log2 units; see the module docstring.

        N_BUCKET is only an autotune key (unused here). T is the fp32 bias table (ignored when not HAS_BIAS).
        GATHER_BRANCH: gather the bias inside a runtime branch (host choice, :func:`_use_gather_branch`).
        """
        PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
        pid = tl.program_id(0)
        num_m = tl.cdiv(N, BLOCK_M)
        pid_m = pid % num_m
        pid_bh = pid // num_m
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        start_m = pid_m * BLOCK_M

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < N

        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        if Q_IS_K:
            q_ptrs = k_base + start_m.to(tl.int64) * stride_kn
            q_ptrs = q_ptrs + (offs_m - start_m)[:, None] * stride_kn + offs_d[None, :] * stride_kd
        else:
            q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qn
            q_ptrs = q_ptrs + (offs_m - start_m)[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

        kv_off_k = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
        kv_off_v = offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        n_full = (N // BLOCK_N) * BLOCK_N
        if HAS_BIAS:
            # Query-side table coordinate a_i (prefix / out-of-range queries: virtual row 2gh - 1).
            tq = offs_m - P
            q_patch = (tq >= 0) & m_mask
            tq = tl.where(q_patch, tq, 0)
            rq = tq // GW
            cq = tq - rq * GW
            rq = tl.where(q_patch, rq, 2 * GH - 1)
            cq = tl.where(q_patch, cq, 0)
            a_q = (rq + GH - 1) * (2 * GW - 1) + cq + GW - 1

            # Near key range: grid rows within BAND_R of the query block's patch rows (one token range).
            first = tl.maximum(start_m, P)
            last = tl.minimum(start_m + BLOCK_M, N) - 1
            r_lo = tl.maximum(first - P, 0) // GW
            r_hi = tl.maximum(last - P, 0) // GW
            row_lo = tl.maximum(r_lo - BAND_R, 0)
            row_hi = tl.minimum(r_hi + BAND_R, GH - 1)
            has_patch = first <= last
            tok_lo = tl.where(has_patch, P + row_lo * GW, 0)
            tok_hi = tl.where(has_patch, P + (row_hi + 1) * GW, 0)
            lo = tl.minimum((tok_lo // BLOCK_N) * BLOCK_N, n_full)
            hi = tl.minimum(tl.maximum(tl.cdiv(tok_hi, BLOCK_N) * BLOCK_N, lo), n_full)

            # Far tiles [0, lo) + [hi, n_full): full tiles, no bias, no masks (one loop, remapped index).
            n_far = (lo + n_full - hi) // BLOCK_N
            for i in range(0, n_far):
                start_n = i * BLOCK_N
                start_n = tl.where(start_n < lo, start_n, start_n + (hi - lo))
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, q, k_base, v_base, kv_off_k, kv_off_v, start_n, stride_kn, stride_vn,
                    offs_n0, d_mask, N, P, GH, GW, qk_scale, T, a_q,
                    BLOCK_N, PAD_D, False, False, IEEE, GATHER_BRANCH,
                )  # fmt: skip
            # Near tiles [lo, hi) + the partial tail tile: table bias (-inf for keys >= N), masked loads.
            n_near = (hi - lo) // BLOCK_N + tl.where(n_full < N, 1, 0)
            for i in range(0, n_near):
                start_n = lo + i * BLOCK_N
                start_n = tl.where(start_n < hi, start_n, n_full)
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, q, k_base, v_base, kv_off_k, kv_off_v, start_n, stride_kn, stride_vn,
                    offs_n0, d_mask, N, P, GH, GW, qk_scale, T, a_q,
                    BLOCK_N, PAD_D, True, True, IEEE, GATHER_BRANCH,
                )  # fmt: skip
        else:
            # Full tiles unmasked, then the partial tail tile with masked loads and -inf logits.
            for start_n in range(0, n_full, BLOCK_N):
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, q, k_base, v_base, kv_off_k, kv_off_v, start_n, stride_kn, stride_vn,
                    offs_n0, d_mask, N, P, GH, GW, qk_scale, T, offs_m,
                    BLOCK_N, PAD_D, False, False, IEEE, GATHER_BRANCH,
                )  # fmt: skip
            if n_full < N:
                acc, l_i, m_i = _attn_tile(
                    acc, l_i, m_i, q, k_base, v_base, kv_off_k, kv_off_v, n_full, stride_kn, stride_vn,
                    offs_n0, d_mask, N, P, GH, GW, qk_scale, T, offs_m,
                    BLOCK_N, PAD_D, False, True, IEEE, GATHER_BRANCH,
                )  # fmt: skip

        acc = acc / l_i[:, None]
        o_ptrs = O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
        o_ptrs = o_ptrs + (offs_m - start_m)[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    def _prune_configs(configs: list, named_args: dict, **kwargs: Any) -> list:
        """``early_config_prune`` of the autotuner: the configs :func:`config_allowed` admits (never none)."""
        merged = {**named_args, **kwargs}
        dtype = merged["K"].dtype
        head_dim = int(merged.get("HEAD_DIM", 64))
        has_bias = bool(merged.get("HAS_BIAS", True))
        gather_branch = merged.get("GATHER_BRANCH")
        gather_branch = None if gather_branch is None else bool(gather_branch)
        n = int(merged["N_BUCKET"])
        kept = [
            cfg
            for cfg in configs
            if config_allowed(
                {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                dtype=dtype,
                head_dim=head_dim,
                has_bias=has_bias,
                n=n,
                gather_branch=gather_branch,
            )
        ]
        return kept or [configs[0]]

    _attn_fwd_autotuned = triton.autotune(
        configs=[
            triton.Config(
                {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in CONFIGS
        ],
        key=["N_BUCKET", "HEAD_DIM", "HAS_BIAS", "Q_IS_K"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_attn_fwd_kernel)
else:  # pragma: no cover
    _attn_fwd_kernel = None
    _attn_fwd_autotuned = None


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_ELEM_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def config_allowed(
    config: dict,
    *,
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool,
    n: int,
    gather_branch: bool | None = None,
) -> bool:
    """Whether the autotuner may launch ``config`` (a :data:`CONFIGS` entry) for these inputs.

    The one pruning rule, used by the autotuner's ``early_config_prune`` and by
    :mod:`naclip_kernels.inspect` (which compiles exactly the configs this admits, at large ``n``). Dropped:

    * shared memory estimate ``elem * BLOCK_D * (BLOCK_M + 2 * BLOCK_N * num_stages)`` (+ ``4 * BLOCK_M *
      BLOCK_N`` for the bias tile's layout conversion when ``has_bias``; + ``4 * BLOCK_M * BLOCK_N *
      (num_stages - 1)`` for the pipeliner's ``cp.async`` staging of the gathered bias when ``has_bias`` and
      not ``gather_branch``) above 160 KB (sm_80: 163 KB);
    * float32 tiles above 64x64 (fp32 runs on the FMA units);
    * ``BLOCK_M > 64`` when ``n`` (tokens; bucketed to the next power of two) is at most 128;
    * tiles above 128x64 with fewer than 8 warps at head dims above 64;
    * with the bias on: more than :data:`BIAS_MAX_SCORES_PER_THREAD` score elements per thread
      (``BLOCK_M * BLOCK_N / (32 * num_warps)``), which spill (module docstring, "register budget").

    Args:
        config: dict with int ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``.
        dtype: torch.float16, torch.bfloat16 or torch.float32 (the q/k/v dtype).
        head_dim: D, 1..128.
        has_bias: whether the Gaussian bias is gathered (``HAS_BIAS``).
        n: N, the number of tokens (> 0).
        gather_branch: the kernel's ``GATHER_BRANCH``; None (default) -> what :func:`triton_attention`
            launches with the installed triton (:func:`_use_gather_branch`).

    Raises:
        TypeError / ValueError: naming the argument, for a bad dtype, config or value.
    """
    if not isinstance(config, dict) or any(k not in config for k in _CONFIG_KEYS):
        raise ValueError(f"config must be a dict with keys {list(_CONFIG_KEYS)}; got {config!r}")
    if dtype not in _ELEM_SIZE:
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32; got {dtype!r}")
    if not 1 <= int(head_dim) <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {head_dim}")
    if int(n) < 1:
        raise ValueError(f"n must be a positive token count; got {n}")
    bm, bn = int(config["BLOCK_M"]), int(config["BLOCK_N"])
    warps, stages = int(config["num_warps"]), max(int(config["num_stages"]), 1)
    elem = _ELEM_SIZE[dtype]
    block_d = _block_d(head_dim)
    if gather_branch is None:
        gather_branch = _gather_branch(dtype)
    smem = elem * block_d * (bm + 2 * bn * stages)
    if has_bias:
        smem += 4 * bm * bn  # layout conversion of the gathered tile
        if not gather_branch:
            smem += 4 * bm * bn * (stages - 1)  # cp.async staging buffers of the pipelined gather
    if smem > _SMEM_BUDGET:
        return False
    if elem == 4 and (bn > 64 or bm > 64):  # fp32 runs on FMA units: small tiles
        return False
    if _n_bucket(n) <= 128 and bm > 64:
        return False
    if block_d > 64 and bm * bn > 128 * 64 and warps < 8:
        return False
    return not (has_bias and bm * bn > BIAS_MAX_SCORES_PER_THREAD * 32 * warps)


def heuristic_config(
    dtype: torch.dtype, head_dim: int, n: int, *, has_bias: bool = True, gather_branch: bool | None = None
) -> dict[str, int]:
    """Fixed config used without autotuning (``NACLIP_TRITON_AUTOTUNE=0`` on a GPU); always admitted by
    :func:`config_allowed` for the same arguments (``gather_branch`` as there)."""
    small = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if n <= 256:
        return small
    if head_dim > 64 or has_bias:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    # Without the gather branch the staged bias tile may not fit (128x64 x 3 stages at D=128).
    allowed = config_allowed(
        cfg, dtype=dtype, head_dim=head_dim, has_bias=has_bias, n=n, gather_branch=gather_branch
    )
    return cfg if allowed else small


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _bias_table_cached(
    gh: int, gw: int, sigma: float, bias_scale: float, device: torch.device
) -> torch.Tensor:
    dr = torch.arange(-(gh - 1), 6 * gh - 1, dtype=torch.float64, device=device)
    dc = torch.arange(-(gw - 1), gw, dtype=torch.float64, device=device)
    coef = gaussian_coef(sigma)
    gy = gaussian(dr * dr, coef)
    gx = gaussian(dc * dc, coef)
    table = ((bias_scale * _LOG2E) * (gy[:, None] * gx[None, :])).to(torch.float32)
    table[dr >= gh] = 0.0
    table[dr >= 4 * gh - 1] = float("-inf")
    return table.reshape(-1).contiguous()


def bias_table(gh: int, gw: int, sigma: float, bias_scale: float, device: torch.device | str) -> torch.Tensor:
    """The kernel's fp32 bias table, flattened ``[(7gh - 2) * (2gw - 1)]`` (see the module docstring).

    ``T[(dr + gh - 1) * (2gw - 1) + dc + gw - 1] = bias_scale * log2(e) * exp(-(dr^2 + dc^2) / (2 sigma^2))``
    for ``|dr| < gh``, ``|dc| < gw``; 0 for ``gh <= dr <= 4gh - 2`` (hit by prefix tokens), -inf for
    ``dr >= 4gh - 1`` (hit by keys past N). Cached per arguments (a small LRU of device tensors).
    """
    return _bias_table_cached(int(gh), int(gw), float(sigma), float(bias_scale), torch.device(device))


@functools.lru_cache(maxsize=8)
def _dummy_table(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def _table_numel(gh: int, gw: int) -> int:
    return (7 * gh - 2) * (2 * gw - 1)


def unsupported_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Any) -> list[str]:
    """Every reason why this kernel cannot run ``q, k, v`` (already validated into ``spec``); [] if it can."""
    reasons: list[str] = []
    if triton is None:
        return [f"triton is not importable ({_TRITON_IMPORT_ERROR})"]
    device = torch.device(spec.device)
    interp = _interpreting()
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
    if spec.D > MAX_HEAD_DIM:
        reasons.append(f"head dim D must be <= {MAX_HEAD_DIM} for the triton kernel; got {spec.D}")
    # Launch size: one program per (batch*head, query block) on a 1-D grid.
    n_programs = spec.B * spec.H * math.ceil(spec.N / 32)
    if n_programs > _INT32_MAX:
        reasons.append(f"B*H*ceil(N/32) must be < 2^31 programs; got {n_programs}")
    # In-tile offsets are int32: BLOCK * |stride_n| + BLOCK_D * |stride_d| must fit.
    for name, t in (("q", q), ("k", k), ("v", v)):
        sn, sd = abs(t.stride(2)), abs(t.stride(3))
        extent = 128 * sn + 128 * sd
        if (sn <= _INT32_MAX and sd <= _INT32_MAX) and extent > _INT32_MAX:
            reasons.append(f"{name} token/feature strides {sn}/{sd} are too large for int32 in-tile offsets")
    if spec.sigma is not None and spec.grid_hw is not None:
        gh, gw = spec.grid_hw
        if _table_numel(gh, gw) > 2**28:
            reasons.append(f"grid_hw={spec.grid_hw} is too large for the bias table (> 2^28 entries)")
    return reasons


def _launch_config(
    dtype: torch.dtype, head_dim: int, n: int, has_bias: bool, gather_branch: bool
) -> dict[str, int] | None:
    if _interpreting():
        return INTERPRETER_CONFIG
    if os.environ.get("NACLIP_TRITON_AUTOTUNE", "1") in ("0", "false", "False", "no"):
        return heuristic_config(dtype, head_dim, n, has_bias=has_bias, gather_branch=gather_branch)
    return None  # autotune


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Any) -> torch.Tensor:
    """``softmax(scale * q k^T + bias_scale * G) v`` with the fused Triton kernel.

    Args:
        q, k, v: ``[B, H, N, D]`` tensors (any strides; ``q is k`` allowed), validated into ``spec``
            (``naclip_kernels._checks.AttentionSpec``: B, H, N, D, grid_hw, sigma, scale, num_prefix_tokens,
            bias_scale, dtype, device).

    Returns:
        A new contiguous ``[B, H, N, D]`` tensor in the input dtype. Prefix tokens (``t < P``) get zero bias
        in their rows and columns; they are otherwise ordinary queries/keys.

    Raises:
        ValueError: listing every reason from :func:`unsupported_reasons` when the kernel cannot run.
    """
    reasons = unsupported_reasons(q, k, v, spec)
    if reasons:
        raise ValueError("backend='triton' cannot run these inputs: " + "; ".join(reasons))
    B, H, N, D = spec.B, spec.H, spec.N, spec.D
    device = torch.device(spec.device)
    out = torch.empty((B, H, N, D), dtype=spec.dtype, device=device)

    has_bias = spec.sigma is not None and spec.bias_scale != 0.0
    band = -1
    gh = gw = 1
    if has_bias:
        gh, gw = spec.grid_hw
        band = band_rows(spec.sigma, spec.bias_scale, gh)
        has_bias = band >= 0
    table = bias_table(gh, gw, spec.sigma, spec.bias_scale, device) if has_bias else _dummy_table(device)
    q_is_k = q is k or (q.data_ptr() == k.data_ptr() and q.stride() == k.stride())

    args = (
        q, k, v, out, table,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, _n_bucket(N), spec.num_prefix_tokens, gh, gw, band, float(spec.scale) * _LOG2E,
    )  # fmt: skip
    meta = {
        "HEAD_DIM": D,
        "BLOCK_D": _block_d(D),
        "HAS_BIAS": has_bias,
        "Q_IS_K": q_is_k,
        "IEEE": spec.dtype == torch.float32,
        "GATHER_BRANCH": _gather_branch(spec.dtype),
    }
    cfg = _launch_config(spec.dtype, D, N, has_bias, meta["GATHER_BRANCH"])
    ctx = torch.cuda.device(device) if device.type == "cuda" else _NullCtx()
    with ctx:
        if cfg is None:
            grid = lambda m: (B * H * triton.cdiv(N, m["BLOCK_M"]),)
            _attn_fwd_autotuned[grid](*args, **meta)
        else:
            grid = (B * H * triton.cdiv(N, cfg["BLOCK_M"]),)
            _attn_fwd_kernel[grid](
                *args,
                **meta,
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"],
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
    return out


class _NullCtx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_DTYPE_STR = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_signature(
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool,
    q_is_k: bool,
    config: dict,
    *,
    gather_branch: bool | None = None,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Signature and constexprs of :data:`_attn_fwd_kernel` for ahead-of-time compilation.

    Returns ``(signature, constexprs)`` for ``triton.compiler.ASTSource(fn=_attn_fwd_kernel,
    signature=signature, constexprs=constexprs)`` (triton 3.6-3.8): pointer args typed ``"*fp16"`` /
    ``"*bf16"`` / ``"*fp32"`` (the bias table always ``"*fp32"``), integer args ``"i32"``, ``qk_scale``
    ``"fp32"``, and every constexpr argument typed ``"constexpr"`` with its value in ``constexprs``. The
    feature strides (``stride_*d``) are specialised to 1 (the common contiguous-last-dim case), as the JIT
    does. ``config`` is one entry of :data:`CONFIGS` (``BLOCK_M``, ``BLOCK_N``; warps/stages go to the compile
    options). Pair it with :func:`aot_attrs` (``attrs=aot_attrs(signature, constexprs)``) for the alignment
    hints the JIT infers at a typical launch. ``GATHER_BRANCH`` is ``gather_branch``, by default (None) what
    :func:`triton_attention` launches with the installed triton (:func:`_use_gather_branch`), so the report
    compiles the kernel this triton would run.
    """
    if dtype not in _DTYPE_STR:
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32; got {dtype!r}")
    head_dim = int(head_dim)
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {head_dim}")
    for key in ("BLOCK_M", "BLOCK_N"):
        if key not in config:
            raise ValueError(f"config must contain {key!r}; got {config!r}")
    ptr = "*" + _DTYPE_STR[dtype]
    constexprs: dict[str, Any] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _block_d(head_dim),
        "BLOCK_M": int(config["BLOCK_M"]),
        "BLOCK_N": int(config["BLOCK_N"]),
        "HAS_BIAS": bool(has_bias),
        "Q_IS_K": bool(q_is_k),
        "IEEE": dtype == torch.float32,
        "GATHER_BRANCH": _gather_branch(dtype) if gather_branch is None else bool(gather_branch),
    }
    signature: dict[str, str] = {}
    for name in _attn_fwd_kernel.arg_names:
        if name in ("Q", "K", "V", "O"):
            signature[name] = ptr
        elif name == "T":
            signature[name] = "*fp32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
    return signature, constexprs


#: The launch :func:`aot_attrs` derives the JIT's alignment hints from: NACLIP's key-key attention for a
#: ViT-B/16 (12 heads) at 448x448 px (28x28 grid + CLS, N = 785), q = k and v strided views of the packed
#: ``[B, N, 3, H, D]`` qkv projection, the bias on (sigma 5), a contiguous ``[B, H, N, D]`` output.
AOT_EXAMPLE = {"H": 12, "grid_hw": (28, 28), "num_prefix_tokens": 1, "sigma": 5.0, "bias_scale": 1.0}


def aot_example_args(head_dim: int) -> dict[str, int]:
    """Integer argument values of :data:`_attn_fwd_kernel` at the :data:`AOT_EXAMPLE` launch, by name."""
    head_dim = int(head_dim)
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {head_dim}")
    ex = AOT_EXAMPLE
    H, D, P = ex["H"], head_dim, ex["num_prefix_tokens"]
    gh, gw = ex["grid_hw"]
    N = P + gh * gw
    packed = {"b": N * 3 * H * D, "h": D, "n": 3 * H * D, "d": 1}  # a view of [B, N, 3, H, D]
    out = {"b": H * N * D, "h": N * D, "n": D, "d": 1}  # contiguous [B, H, N, D]
    args = {f"stride_{t}{a}": v for t in "qkv" for a, v in packed.items()}
    args.update({f"stride_o{a}": v for a, v in out.items()})
    args.update(
        H=H, N=N, N_BUCKET=_n_bucket(N), P=P, GH=gh, GW=gw,
        BAND_R=band_rows(ex["sigma"], ex["bias_scale"], gh),
    )  # fmt: skip
    return args


def aot_attrs(
    signature: dict[str, str], constexprs: dict[str, Any] | None = None
) -> dict[tuple[int, ...], list[list[Any]]]:
    """Alignment attributes for ``ASTSource(..., attrs=aot_attrs(signature, constexprs))`` (triton 3.6-3.8).

    The JIT's own rule (``BaseBackend.get_tensor_specialization`` / ``get_int_specialization``, triton
    3.6-3.8) applied to the :data:`AOT_EXAMPLE` launch at head dim ``constexprs["HEAD_DIM"]`` (64 when not
    given): ``tt.divisibility = 16`` for every pointer (torch allocations are 256-byte aligned and the k / v
    views of the packed qkv start ``H * D`` / ``2 * H * D`` elements in, a multiple of 16 bytes for ``D % 8
    == 0``) and for every ``"i32"`` argument whose example value is a multiple of 16 (the batch/head/token
    strides when ``D % 16 == 0``; also the unused autotune key ``N_BUCKET``). ``N``, ``H``, ``GH``, ``GW``,
    ``BAND_R`` are not (785, 12, 28, 28, 27). The JIT would also turn ``P == 1`` into a constexpr;
    :func:`aot_signature` keeps ``P`` a runtime argument so that the report covers every prefix count (only
    the feature strides are specialised to 1). Keys are ``(argument index,)`` paths.
    """
    head_dim = int((constexprs or {}).get("HEAD_DIM", 64))
    values = aot_example_args(head_dim)
    names = list(_attn_fwd_kernel.arg_names)
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for name, ty in signature.items():
        if ty.startswith("*") or (ty == "i32" and name in values and values[name] % 16 == 0):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return attrs
