"""Forward kernel: ``O = softmax(scale * Q K^T + bias_scale * G) V`` per (batch, head), flash-attention style.

Logits in log2 units (``exp2``; ``log2(e)`` folded into ``qk_scale`` and the bias table), the Gaussian
gathered from a per-head table (no exponential), far key tiles without bias (band bound). Optionally stores
the per-row log-sum-exp (natural log) for the backward. Grid: ``(B * H * cdiv(N, BLOCK_M),)``.
Notes: ``docs/kernel.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import dot_acc, gather, key_coords, load_rows, mm, near_range, query_coords

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, T, ROWS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_th, stride_rh,
    H, N, N_BUCKET, P, GH, GW, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, Q_IS_K: tl.constexpr, IEEE: tl.constexpr, GATHER_BRANCH: tl.constexpr,
    STORE_LSE: tl.constexpr,
):  # fmt: skip
    """One program = one query block of one (batch, head). ``T``: fp32 bias table of head ``h`` at
    ``T + h * stride_th`` (log2 units); ``ROWS[h * stride_rh]``: its band radius in grid rows (int32).
    ``N_BUCKET`` is only an autotune key. ``LSE`` (``[B * H, N]`` fp32) is written when ``STORE_LSE``."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n0 = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = offs_d < HEAD_DIM

    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    if Q_IS_K:  # the query tile is read through K: no separate q stream
        q_base, stride_qn, stride_qd = k_base, stride_kn, stride_kd
    else:
        q_base = Q + off_b * stride_qb + off_h * stride_qh
    q_ptrs = q_base + start_m.to(tl.int64) * stride_qn
    q_ptrs += (offs_m - start_m)[:, None] * stride_qn + offs_d[None, :] * stride_qd  # [BLOCK_M, BLOCK_D]
    q = load_rows(q_ptrs, offs_m, N, d_mask, MASK_ROWS=True, PAD_D=PAD_D)  # [BLOCK_M, BLOCK_D]
    k_tile = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BLOCK_N, BLOCK_D] offsets
    v_tile = offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    if HAS_BIAS:
        table = T + off_h * stride_th
        a_q = query_coords(offs_m, N, P, GH, GW)  # [BLOCK_M]
        radius = tl.load(ROWS + off_h * stride_rh)
        lo, hi = near_range(start_m, N, P, GH, GW, radius, n_full, BLOCK=BLOCK_M, BLOCK_OTHER=BLOCK_N)
        # Far full tiles [0, lo) + [hi, n_full): no bias, no masks (one loop over a remapped index).
        for i in range(0, (lo + n_full - hi) // BLOCK_N):
            start_n = i * BLOCK_N
            start_n = tl.where(start_n < lo, start_n, start_n + (hi - lo))
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, start_n, stride_kn, stride_vn,
                offs_n0, d_mask, N, P, GH, GW, qk_scale, table, a_q,
                APPLY_BIAS=False, MASK_N=False, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
        # Near tiles [lo, hi) + the partial tail tile: table bias (-inf for keys >= N), masked loads.
        for i in range(0, (hi - lo) // BLOCK_N + tl.where(n_full < N, 1, 0)):
            start_n = lo + i * BLOCK_N
            start_n = tl.where(start_n < hi, start_n, n_full)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, start_n, stride_kn, stride_vn,
                offs_n0, d_mask, N, P, GH, GW, qk_scale, table, a_q,
                APPLY_BIAS=True, MASK_N=True, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
    else:
        # Full tiles unmasked, then the partial tail tile with masked loads and -inf logits.
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, start_n, stride_kn, stride_vn,
                offs_n0, d_mask, N, P, GH, GW, qk_scale, T, offs_m,
                APPLY_BIAS=False, MASK_N=False, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
        if n_full < N:
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, n_full, stride_kn, stride_vn,
                offs_n0, d_mask, N, P, GH, GW, qk_scale, T, offs_m,
                APPLY_BIAS=False, MASK_N=True, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip

    m_mask = offs_m < N
    if STORE_LSE:  # natural log: lse = (m + log2 l) * ln 2
        lse_ptrs = LSE + pid_bh.to(tl.int64) * N + offs_m
        tl.store(lse_ptrs, (m_i + tl.math.log2(l_i)) * LN2, mask=m_mask)
    acc = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
    o_ptrs += (offs_m - start_m)[:, None] * stride_on + offs_d[None, :] * stride_od  # [BLOCK_M, BLOCK_D]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_base, v_base, k_tile, v_tile, start_n, stride_kn, stride_vn,
    offs_n0, d_mask, N, P, GH, GW, qk_scale, table, a_q,
    APPLY_BIAS: tl.constexpr, MASK_N: tl.constexpr, PAD_D: tl.constexpr, IEEE: tl.constexpr,
    GATHER_BRANCH: tl.constexpr,
):  # fmt: skip
    """One key/value tile of the online softmax; returns the updated ``(acc, l_i, m_i)``."""
    offs_n = start_n + offs_n0  # [BLOCK_N]
    start64 = tl.cast(start_n, tl.int64)
    k = load_rows(k_base + start64 * stride_kn + k_tile, offs_n, N, d_mask, MASK_ROWS=MASK_N, PAD_D=PAD_D)
    s = mm(q, tl.trans(k), IEEE=IEEE) * qk_scale  # [BLOCK_M, BLOCK_N] log2 units
    if APPLY_BIAS:
        b_k = key_coords(offs_n, N, P, GH, GW)
        s += gather(table, a_q[:, None] - b_k[None, :], N, GATHER_BRANCH=GATHER_BRANCH)
    elif MASK_N:
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    p = tl.math.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.math.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    v = load_rows(v_base + start64 * stride_vn + v_tile, offs_n, N, d_mask, MASK_ROWS=MASK_N, PAD_D=PAD_D)
    acc = dot_acc(p, v, acc, IEEE=IEEE)  # [BLOCK_M, BLOCK_D]
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new
