"""Backward of the torch backend, and its device-agnostic explicit path (forward and backward).

Both recompute per query chunk from q, k, v, the output ``O`` and the saved per-row log-sum-exp ``lse``
(``[B, H, N]``, natural log): nothing ``N x N`` is kept between forward and backward, the extra memory is
``O(N * chunk)`` like the forward. With ``S = scale * Q K^T + bias_scale * G``, ``P = exp(S - lse)``:
``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``,
``d bias_scale_h = sum dS * G``, ``d sigma_h = bias_scale_h * sum dS * G * d^2 / sigma_h^3`` (per head, summed
over batch, queries and keys in a fixed order: deterministic). Derivations: ``docs/autograd.md``.
"""

from __future__ import annotations

import math

import torch

from . import _cpu_kernel
from ._bias import band_rows, gaussian, gaussian_coef
from ._checks import AttentionSpec
from ._layout import empty_output
from .torch_backend import (
    _band,
    _BiasBuilder,
    _env_budget,
    _flash_cpu,
    _lse_dtype,
    _unit_last,
    band_split_radius,
    bias_params,
    mask_dtype,
    mask_row_bytes,
    plan_chunks,
    unit_last_qkv,
)

__all__ = [
    "BiasGrads",
    "explicit_backward",
    "explicit_forward",
    "flash_backward",
    "fused_backward",
    "torch_backward",
]

_flash_cpu_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
#: Rows per explicit-path chunk are chosen so that three ``[batch, H, rows, N]`` work tensors fit here.
EXPLICIT_BUDGET_BYTES = 48 * 2**20
#: Floor of :func:`key_block` and its unit (the CPU flash backward works in blocks of 512 keys).
MIN_KEY_BLOCK = 512
KEY_ALIGN = 512

BiasGrads = tuple[torch.Tensor | None, torch.Tensor | None]


def _work(spec: AttentionSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.float64 else torch.float32


def _grid_terms(spec: AttentionSpec, s: int, e: int, a: int, b: int, dtype: torch.dtype):
    """Row/column offsets ``dy, dx`` ``[e - s, b - a]`` between query tokens ``[s, e)`` and key tokens
    ``[a, b)`` on the patch grid, and ``valid`` (both are patch tokens; prefix pairs get no bias)."""
    P, gw, dev = spec.num_prefix_tokens, spec.grid_hw[1], spec.device  # type: ignore[index]
    i, j = torch.arange(s, e, device=dev), torch.arange(a, b, device=dev)
    ri, ci = torch.div(i - P, gw, rounding_mode="floor"), (i - P) % gw
    rj, cj = torch.div(j - P, gw, rounding_mode="floor"), (j - P) % gw
    dy = (ri[:, None] - rj[None, :]).to(dtype)
    dx = (ci[:, None] - cj[None, :]).to(dtype)
    valid = (i >= P)[:, None] & (j >= P)[None, :]
    return dy, dx, valid


def _log_gaussian(d2: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log G = coef * d^2`` (:func:`naclip_kernels._bias.gaussian_coef`), exactly 0 where ``d^2 = 0`` (also
    when tiny sigma makes ``coef = -inf``)."""
    return torch.where(d2 == 0, torch.zeros_like(d2), d2 * gaussian_coef(sigma))


# ---------------------------------------------------------------------------------------------------------
# explicit path: chunked matmul + softmax in float32 / float64 on any device
# ---------------------------------------------------------------------------------------------------------


def _explicit_rows(spec: AttentionSpec, budget_bytes: int | None) -> int:
    budget = EXPLICIT_BUDGET_BYTES if budget_bytes is None else max(int(budget_bytes), 1)
    per_row = 3 * spec.H * spec.N * torch.empty((), dtype=_work(spec)).element_size()
    return max(1, min(spec.N, budget // per_row))


def _explicit_bias(spec: AttentionSpec, params, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` and ``d^2`` for query rows ``[s, e)``: ``[h, e - s, N]`` and ``[e - s, N]`` in the work dtype."""
    dy, dx, valid = _grid_terms(spec, s, e, 0, spec.N, _work(spec))
    d2 = (dy * dy + dx * dx).mul_(valid)
    g = torch.stack([gaussian(d2, gaussian_coef(sg)) for sg in params.sigmas])
    return g.mul_(valid), d2


def _scales(params, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(params.scales, dtype=like.dtype, device=like.device)[:, None, None]


def _explicit_scores(qc, k, spec, bias):
    s = torch.matmul(qc, k.transpose(-1, -2)).mul_(spec.scale)
    return s if bias is None else s.add_(bias)


def explicit_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, *, budget_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` by chunks of query rows: ``S`` ``[B, H, C, N]`` in float32 (float64 for float64), the
    bias ``bias_scale * G`` built in that dtype (never in half precision), ``lse = logsumexp(S)``,
    ``out = exp(S - lse) V``. ``±inf`` scores give NaN rows, as in float32 attention."""
    work, C = _work(spec), _explicit_rows(spec, budget_bytes)
    params = bias_params(spec) if spec.has_bias else None
    out = empty_output(q)
    lse = torch.empty(spec.B, spec.H, spec.N, dtype=_lse_dtype(spec), device=spec.device)
    kw, vw = k.to(work), v.to(work)
    for s in range(0, spec.N, C):
        e = min(spec.N, s + C)
        bias = None
        if params is not None:
            g, _ = _explicit_bias(spec, params, s, e)
            bias = g.mul_(_scales(params, g))
        sc = _explicit_scores(q[:, :, s:e].to(work), kw, spec, bias)
        m = torch.logsumexp(sc, dim=-1, keepdim=True)
        lse[:, :, s:e] = m.squeeze(-1)
        out[:, :, s:e] = torch.matmul(sc.sub_(m).exp_(), vw)
    return out, lse


def explicit_backward(dout, q, k, v, out, lse, spec, *, need_sigma, need_bias, budget_bytes=None):
    """Gradients by recomputing ``P`` per chunk of query rows (formulas in the module docstring). Returns
    ``(dq, dk, dv, (d_sigma, d_bias_scale))``; the bias grads are per attention head ``[H]`` (work dtype)."""
    work, C = _work(spec), _explicit_rows(spec, budget_bytes)
    params = bias_params(spec) if spec.has_bias else None
    kw, vw, qw = k.to(work), v.to(work), q.to(work)
    dq = torch.empty_like(qw)
    dk, dv = torch.zeros_like(kw), torch.zeros_like(vw)
    dsig = torch.zeros(spec.H, dtype=work, device=spec.device) if need_sigma else None
    dbs = torch.zeros(spec.H, dtype=work, device=spec.device) if need_bias else None
    eq = "bhij,ij->h" if params is None or params.heads == 1 else "bhij,hij->h"
    for s in range(0, spec.N, C):
        e = min(spec.N, s + C)
        g = d2 = bias = None
        if params is not None:
            g, d2 = _explicit_bias(spec, params, s, e)
            bias = g * _scales(params, g)
        qc, doc = qw[:, :, s:e], dout[:, :, s:e].to(work)
        p = _explicit_scores(qc, kw, spec, bias).sub_(lse[:, :, s:e, None].to(work)).exp_()
        dv += torch.matmul(p.transpose(-1, -2), doc)
        dD = (doc * out[:, :, s:e].to(work)).sum(-1, keepdim=True)
        ds = torch.matmul(doc, vw.transpose(-1, -2)).sub_(dD).mul_(p)  # [B, H, C, N]
        dq[:, :, s:e] = torch.matmul(ds, kw).mul_(spec.scale)
        dk += torch.matmul(ds.transpose(-1, -2), qc).mul_(spec.scale)
        if g is not None and dbs is not None:
            dbs += torch.einsum(eq, ds, g.squeeze(0) if params.heads == 1 else g)
        if g is not None and dsig is not None:
            gd2 = g * d2
            dsig += torch.einsum(eq, ds, gd2.squeeze(0) if params.heads == 1 else gd2)
    grads = _finish_bias(params, dsig, dbs, spec.H)
    return dq, dk, dv, grads


def _finish_bias(params, dsig, dbs, H: int) -> BiasGrads:
    """Per attention head sums ``[H]`` (or None) -> ``(d sigma, d bias_scale)`` per head ``[H]``: d sigma is
    scaled by ``bias_scale_h / sigma_h^3``, divided step by step (a zero sum stays zero for tiny sigma)."""
    if params is None:
        return None, None
    d_sig = None
    if dsig is not None:
        sig = torch.tensor(params.sigmas, dtype=dsig.dtype, device=dsig.device).expand(H)
        bs = torch.tensor(params.scales, dtype=dsig.dtype, device=dsig.device).expand(H)
        d_sig = (dsig * bs) / sig / sig / sig
    return d_sig, dbs


# ---------------------------------------------------------------------------------------------------------
# CPU flash path: aten's flash-attention backward per chunk and key piece, bias sums via one extra forward
# ---------------------------------------------------------------------------------------------------------


def _acc_dtype(spec: AttentionSpec) -> torch.dtype:
    return spec.dtype if spec.dtype in (torch.float32, torch.float64) else torch.float32


def key_block(spec: AttentionSpec, q_chunk: int, batch_chunk: int, budget_bytes: int | None = None) -> int:
    """Keys per backward call: the largest multiple of :data:`KEY_ALIGN` whose bias mask ``[h, C, n]`` and
    key / value gradient partials ``2 x [batch_chunk, H, n, D]`` (accumulation dtype) fit in three quarters of
    the budget (:func:`naclip_kernels.torch_backend.plan_chunks`), at least ``min(MIN_KEY_BLOCK, N)``: 2048
    at N = 4097, 12 heads, D = 64 and the default budget."""
    budget = max(int(_env_budget() if budget_bytes is None else budget_bytes), 1)
    acc = torch.empty((), dtype=_acc_dtype(spec)).element_size()
    per_key = mask_row_bytes(spec) // spec.N * q_chunk + 2 * batch_chunk * spec.H * spec.D * acc
    n = max(budget * 3 // 4 // per_key, min(MIN_KEY_BLOCK, spec.N), 1)
    return n if n >= spec.N or n < KEY_ALIGN else n - n % KEY_ALIGN


def _key_blocks(spec: AttentionSpec, s: int, e: int, R: int, kb: int, has_bias: bool):
    """The key blocks ``(a, b, rows)`` of query rows ``[s, e)``: the forward's pieces (the whole row, or the
    band and the bias-free ranges beside it; :func:`naclip_kernels.torch_backend.key_pieces`) cut into about
    ``kb`` keys. ``rows = (kr0, kr1)`` for a block that needs the bias (whole grid rows, the prefix keys
    joined to the first), ``None`` for a bias-free one. Blocks of one piece have <= ``kb + gw`` keys (+ P)."""
    N, P = spec.N, spec.num_prefix_tokens
    if not has_bias or R == -1:
        return [(a, b, None) for a, b in _split(0, N, kb)]
    gh, gw = spec.grid_hw  # type: ignore[misc]
    band = _band(spec, s, e, R)
    a0, b0, kr0, kr1 = (0, N, 0, gh - 1) if band is None else band
    step = max(1, kb // gw)
    out = []
    for r in range(kr0, kr1 + 1, step):
        r1 = min(kr1, r + step - 1)
        out.append((0 if r == 0 else P + r * gw, P + (r1 + 1) * gw, (r, r1)))
    out += [(a, b, None) for a, b in _split(0, a0, kb)] + [(a, b, None) for a, b in _split(b0, N, kb)]
    return out


def _split(a: int, b: int, n: int) -> list[tuple[int, int]]:
    """``[a, b)`` cut into blocks of ``n`` keys, the remainder joined to the last block (< 2n keys)."""
    cuts = list(range(a, b, n))
    if len(cuts) > 1 and b - cuts[-1] < n:
        cuts.pop()
    return [(c, cuts[i + 1] if i + 1 < len(cuts) else b) for i, c in enumerate(cuts)]


def flash_backward(dout, q, k, v, out, lse, spec, *, need_sigma, need_bias, budget_bytes=None):
    """CPU: per query chunk and block of keys, ``_scaled_dot_product_flash_attention_for_cpu_backward``
    with the block's bias mask and the *full-row* ``out`` / ``lse``, which makes every block's
    ``P = exp(S - lse)`` the exact softmax restricted to it: ``dq`` sums over blocks, ``dk`` / ``dv`` over
    chunks (float32 for half inputs), in a fixed order. The first chunk runs the forward's key pieces
    whole (a whole-row piece's ``dk`` / ``dv`` become the accumulators), later chunks cut them into
    :func:`key_block` keys, so one mask block and one ``dk`` / ``dv`` block partial are alive at a time."""
    plan = plan_chunks(spec, budget_bytes)
    C, bc, B, N = plan.q_chunk, plan.batch_chunk, spec.B, spec.N
    q_, k_, v_ = unit_last_qkv(q, k, v)
    do_ = _unit_last(dout)
    params = bias_params(spec) if spec.has_bias else None
    kb = key_block(spec, C, bc, budget_bytes)
    R = band_split_radius(spec, params, "flash")
    acc = _acc_dtype(spec)
    dq = torch.empty(q.shape, dtype=acc, device=spec.device)
    dk = dv = None
    builder = _BiasBuilder(spec, C, params) if params is not None else None
    for s in range(0, N, C):
        e = min(N, s + C)
        if s > 0 and builder is not None and builder.width > kb + spec.grid_hw[1] + spec.num_prefix_tokens:
            builder = None  # free the whole-row mask before the block-sized one
            builder = _BiasBuilder(spec, C, params, cols=kb + spec.grid_hw[1] + spec.num_prefix_tokens)
        blocks = _key_blocks(spec, s, e, R, N if s == 0 else kb, params is not None)
        for b0 in range(0, B, bc):
            bs_ = slice(b0, min(B, b0 + bc))
            for i, (a, b, rows) in enumerate(blocks):
                m = None if rows is None else builder.fill_band(s, e, a, *rows)[None]  # type: ignore[union-attr]
                gq, gk, gv = _flash_cpu_bwd(
                    do_[bs_, :, s:e], q_[bs_, :, s:e], k_[bs_, :, a:b], v_[bs_, :, a:b], out[bs_, :, s:e],
                    lse[bs_, :, s:e], 0.0, False, attn_mask=m, scale=spec.scale,
                )  # fmt: skip
                _accumulate(dq[bs_, :, s:e], gq, first=i == 0)
                if dk is None and (a, b, b0, bs_.stop) == (0, N, 0, B) and gk.dtype == acc:
                    dk, dv = gk, gv  # the whole first chunk over every key: its grads are the accumulators
                else:
                    if dk is None:
                        dk = torch.empty(k.shape, dtype=acc, device=spec.device)
                        dv = torch.empty(v.shape, dtype=acc, device=spec.device)
                    _accumulate(dk[bs_, :, a:b], gk, first=s == 0)
                    _accumulate(dv[bs_, :, a:b], gv, first=s == 0)  # type: ignore[index]
                del gq, gk, gv, m  # before the next call allocates its own
    del builder
    grads: BiasGrads = (None, None)
    if params is not None and (need_sigma or need_bias):
        grads = _flash_bias_grads(do_, q_, k_, v_, out, lse, spec, params, plan, need_sigma, need_bias)
    return dq, dk, dv, grads


def _accumulate(dst: torch.Tensor, part: torch.Tensor, *, first: bool) -> None:
    """``dst = part`` on the first visit, else ``dst += part`` (in ``dst``'s dtype)."""
    if first:
        dst.copy_(part)
    else:
        dst.add_(part)


def _weight_windows(spec, params, *, with_d2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``bias_scale * G + log F`` (``F = G`` or ``G * d^2``; ``-inf`` where ``F = 0``) depends on the grid
    offset only, so one ``[h, 2 gh - 1, 2 gw - 1]`` table ``T`` (reversed: ``T[a, b]`` holds the offset
    ``(gh - 1 - a, gw - 1 - b)``) serves every query: the mask row of query ``(r, c)`` is the window
    ``T[gh - 1 - r :, gw - 1 - c :][:gh, :gw]``. Returns the windows ``[h, gh, gw, gh, gw]`` (a strided view,
    indexed by the reversed query position) and per head whether any entry is finite (else the head's rows
    contribute 0)."""
    gh, gw = spec.grid_hw  # type: ignore[misc]
    dt, dev = mask_dtype(spec), spec.device
    dy = torch.arange(gh - 1, -gh, -1, dtype=dt, device=dev)
    dx = torch.arange(gw - 1, -gw, -1, dtype=dt, device=dev)
    d2 = dy[:, None] * dy[:, None] + dx[None, :] * dx[None, :]
    logd2 = torch.log(d2) if with_d2 else 0.0
    rows = []
    for sg, bsc in zip(params.sigmas, params.scales, strict=True):
        lg = _log_gaussian(d2, sg)
        rows.append(torch.exp(lg).mul_(bsc).add_(lg).add_(logd2))
    table = torch.stack(rows)  # [h, 2gh - 1, 2gw - 1], contiguous
    h, W = table.shape[0], 2 * gw - 1
    windows = table.as_strided((h, gh, gw, gh, gw), (table.stride(0), W, 1, W, 1))
    return windows, (table > -math.inf).flatten(1).any(-1)


def _weight_mask(spec, windows: torch.Tensor, s: int, e: int, a: int, kr0: int, kr1: int) -> torch.Tensor:
    """``[1, h, e - s, b - a]`` mask for patch query rows ``[s, e)`` (``s >= P``) and the key tokens of grid
    rows ``kr0..kr1`` (from ``a``: the prefix keys too when ``a == 0``, as ``-inf``: ``F = 0``)."""
    P, gw, dev = spec.num_prefix_tokens, spec.grid_hw[1], spec.device  # type: ignore[index]
    gh = spec.grid_hw[0]  # type: ignore[index]
    i = torch.arange(s - P, e - P, device=dev)
    r_rev = (gh - 1) - torch.div(i, gw, rounding_mode="floor")
    c_rev = (gw - 1) - i % gw
    h, pc = windows.shape[0], (P if a == 0 else 0)
    nk = (kr1 - kr0 + 1) * gw
    m = windows.new_empty(h, e - s, pc + nk)
    m[:, :, :pc] = -math.inf
    m[:, :, pc:] = windows[:, r_rev, c_rev, kr0 : kr1 + 1].reshape(h, e - s, nk)
    return m[None]


def _grad_radius(spec: AttentionSpec, params) -> int:
    """Band radius for the bias grads: beyond it ``G`` and ``(d^2 / sigma^2) G`` are below 2^-24 as well
    (:func:`naclip_kernels._bias.band_rows` with ``for_grad``)."""
    gh = spec.grid_hw[0]  # type: ignore[index]
    return max(
        band_rows(sg, bs, gh, for_grad=True) for sg, bs in zip(params.sigmas, params.scales, strict=True)
    )


def _flash_bias_grads(do_, q_, k_, v_, out, lse, spec, params, plan, need_sigma, need_bias) -> BiasGrads:
    """``sum_j dS_ij F_ij`` for ``F = G`` (d bias_scale) and ``F = G * d^2`` (d sigma) without ``dS``: with
    ``W = P * F``, ``sum_j dS_ij F_ij = sum_j W_ij (dO_i . v_j - dO_i . O_i)``, and one flash forward with the
    mask ``bias_scale * G + log F`` returns ``O'_i = sum_j W_ij v_j / Z_i`` and ``lse'_i = lse_i + log Z_i``
    (``Z_i = sum_j W_ij``), so the sum is ``exp(lse'_i - lse_i) * dO_i . (O'_i - O_i)``. Keys beyond the
    band have ``G`` and ``(d^2 / sigma^2) G`` below 2^-24 (:func:`_grad_radius`) and are skipped. A head whose
    ``F`` is zero everywhere (tiny sigma, a 1x1 grid; flash then reports lse 0) contributes 0."""
    P, N, B, C, bc = spec.num_prefix_tokens, spec.N, spec.B, plan.q_chunk, plan.batch_chunk
    work = _work(spec)
    kinds = [kind for kind, need in (("sigma", need_sigma), ("bias", need_bias)) if need]
    sums = {kind: torch.zeros(spec.H, dtype=work, device=spec.device) for kind in kinds}
    R = -2 if band_split_radius(spec, params, "flash") == -2 else _grad_radius(spec, params)
    tables = {kind: _weight_windows(spec, params, with_d2=kind == "sigma") for kind in kinds}
    for s in range(0, N, C):
        e = min(N, s + C)
        ps = max(s, P)  # prefix query rows have F = 0
        if ps >= e:
            continue
        band = _band(spec, s, e, R)
        a, b, kr0, kr1 = (0, N, 0, spec.grid_hw[0] - 1) if band is None else band
        for kind in kinds:
            windows, head_ok = tables[kind]
            m = _weight_mask(spec, windows, ps, e, a, kr0, kr1)
            for b0 in range(0, B, bc):
                bs_ = slice(b0, min(B, b0 + bc))
                o1, l1 = _flash_cpu(
                    q_[bs_, :, ps:e], k_[bs_, :, a:b], v_[bs_, :, a:b], attn_mask=m, scale=spec.scale
                )
                w = torch.exp(l1.to(work) - lse[bs_, :, ps:e].to(work)).mul_(head_ok[:, None])
                dot = (do_[bs_, :, ps:e].to(work) * (o1.to(work) - out[bs_, :, ps:e].to(work))).sum(-1)
                sums[kind] += (w * dot).sum((0, 2))
    return _finish_bias(params, sums.get("sigma"), sums.get("bias"), spec.H)


def fused_backward(dout, q, k, v, out, lse, spec, *, need_sigma, need_bias) -> tuple:
    """float32 CPU: the fused kernel (:mod:`naclip_kernels._cpu_kernel`), one pass over the scores for the
    input gradients and the bias sums together. Returns what :func:`torch_backward` returns."""
    params = bias_params(spec) if spec.has_bias else None
    q_, k_, v_ = unit_last_qkv(q, k, v)
    sigmas, scales = (params.sigmas, params.scales) if params is not None else ((), ())
    dq, dk, dv, sum_g, sum_gd2 = _cpu_kernel.backward(
        _unit_last(dout), q_, k_, v_, _unit_last(out), lse, spec, sigmas, scales
    )
    grads: BiasGrads = (None, None)
    if params is not None and (need_sigma or need_bias):
        d_sig, d_bs = _finish_bias(
            params, sum_gd2 if need_sigma else None, sum_g if need_bias else None, spec.H
        )
        grads = (None if d_sig is None else d_sig.float(), None if d_bs is None else d_bs.float())
    return dq, dk, dv, grads


def torch_backward(dout, q, k, v, out, lse, spec, *, need_sigma=False, need_bias=False, budget_bytes=None):
    """Gradients of :func:`naclip_kernels.torch_backend.torch_attention` given ``dout``, the saved ``out`` and
    ``lse``: ``(dq, dk, dv, (d_sigma, d_bias_scale))`` with ``dq, dk, dv`` in the input dtype and the bias
    grads per attention head ``[H]`` (float32; float64 for float64), ``None`` where not requested. Uses the
    CPU flash backward when the forward could (see ``choose_impl``), else the explicit path."""
    from .torch_backend import choose_impl

    impl = choose_impl(spec, k, needs_lse=True)
    if impl == "flash" and spec.dtype == torch.float32 and _cpu_kernel.status().available:
        return fused_backward(dout, q, k, v, out, lse, spec, need_sigma=need_sigma, need_bias=need_bias)
    fn = flash_backward if impl == "flash" else explicit_backward
    dq, dk, dv, grads = fn(
        dout, q, k, v, out, lse, spec, need_sigma=need_sigma, need_bias=need_bias, budget_bytes=budget_bytes
    )
    return dq.to(spec.dtype), dk.to(spec.dtype), dv.to(spec.dtype), grads
