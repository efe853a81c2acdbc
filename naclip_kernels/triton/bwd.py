"""Backward kernels (FlashAttention-2 style) for ``O = softmax(S) V``, ``S = scale * Q K^T + bias_scale * G``.

``P`` is recomputed from the saved per-row log-sum-exp; with ``dO`` given and ``D_i = rowsum(dO * O)``
(preprocess kernel): ``dV = P^T dO``, ``dS = P * (dO V^T - D)``, ``dK = scale * dS^T Q`` (one program per key
block, iterating query tiles), ``dQ = scale * dS K`` (one program per query block, iterating key tiles). The
dQ kernel also writes per-row ``sum_j dS * G`` and ``sum_j dS * G * d^2`` for d(bias_scale) and dsigma
(summed on the host: deterministic, no atomics). Bias re-gathered from the forward's table; far tiles skip it
under the same band radius. Grids: ``(B * H * cdiv(N, BLOCK),)``. Notes: ``docs/kernel.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import dot_acc, gather, key_coords, load_rows, mm, near_range, query_coords

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, T, ROWS,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_th, stride_rh,
    H, N, N_BUCKET, P, GH, GW, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, Q_IS_K: tl.constexpr, IEEE: tl.constexpr, GATHER_BRANCH: tl.constexpr,
):  # fmt: skip
    """One program = one key block of one (batch, head): ``dK``, ``dV`` rows ``[start_n, start_n + BLOCK_N)``
    (``DK``, ``DV``: contiguous ``[B, H, N, D]``), looping over every query tile (near ones with the bias)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N

    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_m0 = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = offs_d < HEAD_DIM

    k_base = K + off_b * stride_kb + off_h * stride_kh
    if Q_IS_K:
        q_base, stride_qn, stride_qd = k_base, stride_kn, stride_kd
    else:
        q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    row_off = (offs_n - start_n)[:, None]
    k_ptrs = k_base + start_n.to(tl.int64) * stride_kn + row_off * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + start_n.to(tl.int64) * stride_vn
    v_ptrs += row_off * stride_vn + offs_d[None, :] * stride_vd
    k = load_rows(k_ptrs, offs_n, N, d_mask, MASK_ROWS=True, PAD_D=PAD_D)  # [BLOCK_N, BLOCK_D]
    v = load_rows(v_ptrs, offs_n, N, d_mask, MASK_ROWS=True, PAD_D=PAD_D)  # [BLOCK_N, BLOCK_D]
    q_tile = offs_m0[:, None] * stride_qn + offs_d[None, :] * stride_qd  # [BLOCK_M, BLOCK_D] offsets
    do_tile = offs_m0[:, None] * stride_don + offs_d[None, :] * stride_dod
    lse_bh = LSE + pid_bh.to(tl.int64) * N
    delta_bh = DELTA + pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    if HAS_BIAS:
        table = T + off_h * stride_th
        b_k = key_coords(offs_n, N, P, GH, GW)  # [BLOCK_N]
        radius = tl.load(ROWS + off_h * stride_rh)
        lo, hi = near_range(start_n, N, P, GH, GW, radius, m_full, BLOCK=BLOCK_N, BLOCK_OTHER=BLOCK_M)
        # Far full query tiles [0, lo) + [hi, m_full): no bias, no masks.
        for i in range(0, (lo + m_full - hi) // BLOCK_M):
            start_m = i * BLOCK_M
            start_m = tl.where(start_m < lo, start_m, start_m + (hi - lo))
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, q_tile, do_tile, start_m, stride_qn, stride_don,
                lse_bh, delta_bh, offs_m0, d_mask, N, P, GH, GW, qk_scale, table, b_k,
                APPLY_BIAS=False, MASK_M=False, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
        # Near query tiles [lo, hi) + the partial tail tile: table bias, masked loads.
        for i in range(0, (hi - lo) // BLOCK_M + tl.where(m_full < N, 1, 0)):
            start_m = lo + i * BLOCK_M
            start_m = tl.where(start_m < hi, start_m, m_full)
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, q_tile, do_tile, start_m, stride_qn, stride_don,
                lse_bh, delta_bh, offs_m0, d_mask, N, P, GH, GW, qk_scale, table, b_k,
                APPLY_BIAS=True, MASK_M=True, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
    else:
        for start_m in range(0, m_full, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, q_tile, do_tile, start_m, stride_qn, stride_don,
                lse_bh, delta_bh, offs_m0, d_mask, N, P, GH, GW, qk_scale, T, offs_n,
                APPLY_BIAS=False, MASK_M=False, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
        if m_full < N:
            dk, dv = _dkdv_tile(
                dk, dv, k, v, q_base, do_base, q_tile, do_tile, m_full, stride_qn, stride_don,
                lse_bh, delta_bh, offs_m0, d_mask, N, P, GH, GW, qk_scale, T, offs_n,
                APPLY_BIAS=False, MASK_M=True, PAD_D=PAD_D, IEEE=IEEE, GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip

    out_off = pid_bh.to(tl.int64) * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    out_mask = (offs_n < N)[:, None] & d_mask[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, T, ROWS, G, GD2, DSG, DSGD2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_th, stride_rh, stride_gh,
    H, N, N_BUCKET, P, GH, GW, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, Q_IS_K: tl.constexpr, IEEE: tl.constexpr,
    GATHER_BRANCH: tl.constexpr,
):  # fmt: skip
    """One program = one query block of one (batch, head): ``dQ`` rows (``DQ`` contiguous ``[B, H, N, D]``)
    and, when ``BIAS_GRAD``, per-row ``DSG = sum_j dS G``, ``DSGD2 = sum_j dS G d^2`` (``[B * H, N]``) from
    the unscaled tables ``G``, ``GD2`` of head ``h`` at ``h * stride_gh``."""
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
    m_mask = offs_m < N

    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    if Q_IS_K:
        q_base, stride_qn, stride_qd = k_base, stride_kn, stride_kd
    else:
        q_base = Q + off_b * stride_qb + off_h * stride_qh
    row_off = (offs_m - start_m)[:, None]
    q_ptrs = q_base + start_m.to(tl.int64) * stride_qn + row_off * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_don
    do_ptrs += row_off * stride_don + offs_d[None, :] * stride_dod
    q = load_rows(q_ptrs, offs_m, N, d_mask, MASK_ROWS=True, PAD_D=PAD_D)  # [BLOCK_M, BLOCK_D]
    do = load_rows(do_ptrs, offs_m, N, d_mask, MASK_ROWS=True, PAD_D=PAD_D)  # [BLOCK_M, BLOCK_D]
    row_ptr = pid_bh.to(tl.int64) * N + offs_m
    # Rows >= N: lse = +inf makes their P (and dS) exactly 0.
    lse2 = tl.load(LSE + row_ptr, mask=m_mask, other=float("inf")) * LOG2E  # [BLOCK_M] log2 units
    delta = tl.load(DELTA + row_ptr, mask=m_mask, other=0.0)  # [BLOCK_M]
    k_tile = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BLOCK_N, BLOCK_D] offsets
    v_tile = offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dsg = tl.zeros([BLOCK_M], dtype=tl.float32)
    dsgd2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    if HAS_BIAS:
        table = T + off_h * stride_th
        g_table = G + off_h * stride_gh
        gd2_table = GD2 + off_h * stride_gh
        a_q = query_coords(offs_m, N, P, GH, GW)  # [BLOCK_M]
        radius = tl.load(ROWS + off_h * stride_rh)
        lo, hi = near_range(start_m, N, P, GH, GW, radius, n_full, BLOCK=BLOCK_M, BLOCK_OTHER=BLOCK_N)
        for i in range(0, (lo + n_full - hi) // BLOCK_N):  # far full tiles: no bias, no masks
            start_n = i * BLOCK_N
            start_n = tl.where(start_n < lo, start_n, start_n + (hi - lo))
            dq, dsg, dsgd2 = _dq_tile(
                dq, dsg, dsgd2, q, do, lse2, delta, k_base, v_base, k_tile, v_tile, start_n, stride_kn,
                stride_vn, offs_n0, d_mask, N, P, GH, GW, qk_scale, table, g_table, gd2_table, a_q,
                APPLY_BIAS=False, MASK_N=False, BIAS_GRAD=False, PAD_D=PAD_D, IEEE=IEEE,
                GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
        for i in range(0, (hi - lo) // BLOCK_N + tl.where(n_full < N, 1, 0)):  # near tiles + tail
            start_n = lo + i * BLOCK_N
            start_n = tl.where(start_n < hi, start_n, n_full)
            dq, dsg, dsgd2 = _dq_tile(
                dq, dsg, dsgd2, q, do, lse2, delta, k_base, v_base, k_tile, v_tile, start_n, stride_kn,
                stride_vn, offs_n0, d_mask, N, P, GH, GW, qk_scale, table, g_table, gd2_table, a_q,
                APPLY_BIAS=True, MASK_N=True, BIAS_GRAD=BIAS_GRAD, PAD_D=PAD_D, IEEE=IEEE,
                GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
    else:
        for start_n in range(0, n_full, BLOCK_N):
            dq, dsg, dsgd2 = _dq_tile(
                dq, dsg, dsgd2, q, do, lse2, delta, k_base, v_base, k_tile, v_tile, start_n, stride_kn,
                stride_vn, offs_n0, d_mask, N, P, GH, GW, qk_scale, T, T, T, offs_m,
                APPLY_BIAS=False, MASK_N=False, BIAS_GRAD=False, PAD_D=PAD_D, IEEE=IEEE,
                GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip
        if n_full < N:
            dq, dsg, dsgd2 = _dq_tile(
                dq, dsg, dsgd2, q, do, lse2, delta, k_base, v_base, k_tile, v_tile, n_full, stride_kn,
                stride_vn, offs_n0, d_mask, N, P, GH, GW, qk_scale, T, T, T, offs_m,
                APPLY_BIAS=False, MASK_N=True, BIAS_GRAD=False, PAD_D=PAD_D, IEEE=IEEE,
                GATHER_BRANCH=GATHER_BRANCH,
            )  # fmt: skip

    out_off = pid_bh.to(tl.int64) * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if BIAS_GRAD:
        tl.store(DSG + row_ptr, dsg, mask=m_mask)
        tl.store(DSGD2 + row_ptr, dsgd2, mask=m_mask)


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``DELTA[bh, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]`` in fp32 (``[B * H, N]``)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + rows * stride_on + offs_d[None, :] * stride_od
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + rows * stride_don + offs_d[None, :] * stride_dod
    o = tl.load(o_ptrs, mask=mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(do_ptrs, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_base, do_base, q_tile, do_tile, start_m, stride_qn, stride_don,
    lse_bh, delta_bh, offs_m0, d_mask, N, P, GH, GW, qk_scale, table, b_k,
    APPLY_BIAS: tl.constexpr, MASK_M: tl.constexpr, PAD_D: tl.constexpr, IEEE: tl.constexpr,
    GATHER_BRANCH: tl.constexpr,
):  # fmt: skip
    """One query tile's part of a key block's ``dK``, ``dV`` (transposed scores ``[BLOCK_N, BLOCK_M]``)."""
    offs_m = start_m + offs_m0  # [BLOCK_M]
    start64 = tl.cast(start_m, tl.int64)
    q = load_rows(q_base + start64 * stride_qn + q_tile, offs_m, N, d_mask, MASK_ROWS=MASK_M, PAD_D=PAD_D)
    do = load_rows(do_base + start64 * stride_don + do_tile, offs_m, N, d_mask, MASK_ROWS=MASK_M, PAD_D=PAD_D)
    if MASK_M:  # rows >= N: lse = +inf, so their P is exactly 0
        lse = tl.load(lse_bh + offs_m, mask=offs_m < N, other=float("inf"))
        delta = tl.load(delta_bh + offs_m, mask=offs_m < N, other=0.0)
    else:
        lse = tl.load(lse_bh + offs_m)
        delta = tl.load(delta_bh + offs_m)
    s_t = mm(k, tl.trans(q), IEEE=IEEE) * qk_scale  # [BLOCK_N, BLOCK_M] log2 units
    if APPLY_BIAS:
        a_q = query_coords(offs_m, N, P, GH, GW)
        s_t += gather(table, a_q[None, :] - b_k[:, None], N, GATHER_BRANCH=GATHER_BRANCH)
    p_t = tl.math.exp2(s_t - (lse * LOG2E)[None, :])  # [BLOCK_N, BLOCK_M]
    dv = dot_acc(p_t, do, dv, IEEE=IEEE)  # [BLOCK_N, BLOCK_D]
    dp_t = mm(v, tl.trans(do), IEEE=IEEE)  # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk = dot_acc(ds_t, q, dk, IEEE=IEEE)  # [BLOCK_N, BLOCK_D]
    return dk, dv


@triton.jit
def _dq_tile(
    dq, dsg, dsgd2, q, do, lse2, delta, k_base, v_base, k_tile, v_tile, start_n, stride_kn, stride_vn,
    offs_n0, d_mask, N, P, GH, GW, qk_scale, table, g_table, gd2_table, a_q,
    APPLY_BIAS: tl.constexpr, MASK_N: tl.constexpr, BIAS_GRAD: tl.constexpr, PAD_D: tl.constexpr,
    IEEE: tl.constexpr, GATHER_BRANCH: tl.constexpr,
):  # fmt: skip
    """One key tile's contribution to ``dQ`` of a query block (and to the bias-gradient row sums)."""
    offs_n = start_n + offs_n0  # [BLOCK_N]
    start64 = tl.cast(start_n, tl.int64)
    k = load_rows(k_base + start64 * stride_kn + k_tile, offs_n, N, d_mask, MASK_ROWS=MASK_N, PAD_D=PAD_D)
    v = load_rows(v_base + start64 * stride_vn + v_tile, offs_n, N, d_mask, MASK_ROWS=MASK_N, PAD_D=PAD_D)
    s = mm(q, tl.trans(k), IEEE=IEEE) * qk_scale  # [BLOCK_M, BLOCK_N] log2 units
    if APPLY_BIAS:
        idx = a_q[:, None] - key_coords(offs_n, N, P, GH, GW)[None, :]  # [BLOCK_M, BLOCK_N]
        s += gather(table, idx, N, GATHER_BRANCH=GATHER_BRANCH)
    elif MASK_N:
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    dp = mm(do, tl.trans(v), IEEE=IEEE)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dq = dot_acc(ds, k, dq, IEEE=IEEE)  # [BLOCK_M, BLOCK_D]
    if BIAS_GRAD:  # natural-unit dS against the unscaled G and G * d^2
        dsg += tl.sum(ds * gather(g_table, idx, N, GATHER_BRANCH=GATHER_BRANCH), 1)
        dsgd2 += tl.sum(ds * gather(gd2_table, idx, N, GATHER_BRANCH=GATHER_BRANCH), 1)
    return dq, dsg, dsgd2
