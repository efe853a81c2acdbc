"""Memory-efficient PyTorch backend: query-chunked ``scaled_dot_product_attention`` with an on-the-fly bias.

For each chunk of ``C`` query tokens the ``[C, N]`` slice of ``bias_scale * G`` is built from token indices
with the separable form ``G[(r1, c1), (r2, c2)] = gy[r1, r2] * gx[c1, c2]`` (``C*(gh+gw)`` exps, then one
broadcast multiply) and passed to ``F.scaled_dot_product_attention`` as an additive float mask, shared by
every batch item and head. The fused SDPA kernels (CPU flash attention, CUDA memory-efficient attention)
accumulate in float32 and never materialise the ``N x N`` score matrix, so the extra memory is ``O(C * N)``
for the mask plus one output chunk; ``C`` is chosen from a byte budget (:func:`plan_chunks`), not tuned to
one N.

On CPU, key tokens more than ``R`` grid rows from every query of a chunk (:func:`band_radius`: there
``|bias_scale * G| < 2^-24``, i.e. below float32 resolution) are attended without the mask through the faster
unmasked flash kernel, and the partial results are merged exactly via their log-sum-exps (torch's
``_scaled_dot_product_flash_attention_for_cpu``; without that op every chunk uses the full mask). This pays
off at large grids (N = 16385: about half the keys of a chunk are bias-free at sigma = 5).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._bias import BIAS_EPS as BAND_EPS  # noqa: F401 (re-exported: the torch backend's name)
from ._bias import band_radius
from ._checks import AttentionSpec
from .reference import gaussian_factors

__all__ = ["torch_attention", "plan_chunks", "clear_workspace", "ChunkPlan", "DEFAULT_BUDGET_BYTES"]

#: Default byte budget for the per-chunk bias slice plus one output chunk. Overridable with the env var
#: ``NACLIP_TORCH_CHUNK_BYTES`` (read per call) or the ``budget_bytes`` argument.
DEFAULT_BUDGET_BYTES = 32 * 2**20
_ENV_BUDGET = "NACLIP_TORCH_CHUNK_BYTES"
#: Query rows per SDPA call below which torch's CPU flash-attention kernel switches from 256-row to 64/32-row
#: query blocks (measured ~1.5-3x slower per row), so chunks are kept at least this tall when N allows. This
#: is a property of the kernel, not of N: the memory stays O(N * chunk).
MIN_EFFICIENT_ROWS = 768
_ROW_ALIGN = 256  # the CPU kernel's query block at q_len >= 768


@dataclass(frozen=True)
class ChunkPlan:
    """How :func:`torch_attention` tiles one call.

    Attributes:
        q_chunk: query tokens per SDPA call (``C``; the last chunk may be shorter).
        batch_chunk: batch items per SDPA call.
        mask_bytes: bytes of the ``[C, N]`` bias buffer (0 without bias).
        out_bytes: bytes of one SDPA output chunk ``[batch_chunk, H, C, D]``.
    """

    q_chunk: int
    batch_chunk: int
    mask_bytes: int
    out_bytes: int

    @property
    def peak_extra_bytes(self) -> int:
        """Bytes allocated by the backend besides its output (excluding SDPA's small per-thread scratch)."""
        return self.mask_bytes + self.out_bytes


def _env_budget() -> int:
    """``$NACLIP_TORCH_CHUNK_BYTES`` as an int (unset or empty -> :data:`DEFAULT_BUDGET_BYTES`); ValueError
    naming the variable for a value that is not an integer."""
    env = os.environ.get(_ENV_BUDGET)
    if env is None or env.strip() == "":
        return DEFAULT_BUDGET_BYTES
    try:
        return int(env)
    except ValueError:
        raise ValueError(
            f"environment variable {_ENV_BUDGET} must be an integer number of bytes; got {env!r}"
        ) from None


def plan_chunks(
    spec: AttentionSpec, budget_bytes: int | None = None, *, min_rows: int = MIN_EFFICIENT_ROWS
) -> ChunkPlan:
    """Choose the query chunk ``C`` and batch chunk for :func:`torch_attention`.

    ``C`` is the largest row count whose float32 ``[C, N]`` bias slice plus one ``[1, H, C, D]`` output chunk
    fit in ``budget_bytes`` (default :data:`DEFAULT_BUDGET_BYTES`), but at least ``min(min_rows, N)`` rows
    (SDPA efficiency floor), rounded to 256-row blocks and balanced over ``ceil(N / C)`` chunks. The batch is
    split so that one output chunk of ``batch_chunk`` items fits in half the budget; with a single query chunk
    SDPA writes the final output directly (no chunk buffer, no batch split).
    Memory is therefore ``O(N * C)``; a full ``N x N`` buffer is requested only when it fits in the budget
    or ``N <= min_rows``.
    """
    if budget_bytes is None:
        budget_bytes = _env_budget()
    budget = max(int(budget_bytes), 1)
    N, H, D, B = spec.N, spec.H, spec.D, spec.B
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    row_out = H * D * itemsize  # output bytes of one query row of one batch item
    row_mask = 4 * N if spec.has_bias else 0
    c_max = max(budget // (row_mask + row_out), max(1, min_rows))
    if c_max >= N:
        c = N
    else:
        align = _ROW_ALIGN if c_max >= _ROW_ALIGN else (32 if c_max >= 32 else 1)
        c_max -= c_max % align
        n_chunks = -(-N // c_max)
        c = -(-N // n_chunks)
        c = min(c_max, -(-c // align) * align)
    mask_bytes = row_mask * c
    if c == N:  # one query chunk: SDPA writes the final output itself, no chunk buffer
        return ChunkPlan(q_chunk=c, batch_chunk=B, mask_bytes=mask_bytes, out_bytes=0)
    # output chunks stay within half the budget (and below glibc's 32 MB mmap threshold at the default)
    b = max(1, min(B, (budget // 2) // (c * row_out)))
    return ChunkPlan(q_chunk=c, batch_chunk=b, mask_bytes=mask_bytes, out_bytes=b * c * row_out)


#: CPU bias buffers up to this many bytes are kept per thread between calls, together with what they hold:
#: repeated calls on the same grid (e.g. every sliding-window crop) then skip both the allocation (page
#: faults) and the fill. Larger buffers are allocated per call. :func:`clear_workspace` releases them.
WORKSPACE_CACHE_BYTES = 8 * 2**20
_tls = threading.local()


def clear_workspace() -> None:
    """Free this thread's cached bias buffers (at most :data:`WORKSPACE_CACHE_BYTES` per device and dtype)."""
    _tls.__dict__.clear()


class _BiasBuilder:
    """Fills ``[C, N]`` slices of ``bias_scale * G`` (query rows ``[s, e)``) into one reused buffer.

    Per chunk: two row gathers from the 1-D factor tables (``[C, gh]``, ``[C, gw]``) and one broadcast
    multiply into the patch columns; zeros in the prefix columns and prefix rows. A cached buffer that already
    holds the requested slice (same grid, sigma, bias_scale, rows) is returned as it is.
    """

    def __init__(self, spec: AttentionSpec, rows: int) -> None:
        if spec.grid_hw is None or spec.sigma is None:  # excluded by check_inputs / has_bias
            raise ValueError("internal: the bias builder needs grid_hw and sigma")
        self.spec = spec
        self.P = spec.num_prefix_tokens
        self.gh, self.gw = spec.grid_hw
        self.N = spec.N
        dev = spec.device
        # CPU flash attention reads a float32 mask for every q dtype; CUDA kernels want the mask in q's dtype.
        self.dtype = torch.float32 if dev.type == "cpu" else spec.dtype
        # rows padded to a multiple of 16 elements: aligned rows spare CUDA SDPA a padded copy of the mask
        n_pad = -(-self.N // 16) * 16 if dev.type != "cpu" else self.N
        numel = rows * n_pad
        nbytes = numel * torch.empty((), dtype=self.dtype).element_size()
        if dev.type == "cpu" and nbytes <= WORKSPACE_CACHE_BYTES:  # CUDA: the caching allocator suffices
            ws = _tls.__dict__.setdefault("ws", {})
            key = (str(dev), self.dtype)
            entry = ws.get(key)
            if entry is None or entry[0].numel() < numel:
                # A buffer reused across calls must be a normal tensor even when first made under
                # torch.inference_mode(): inference tensors cannot be written in place outside that mode.
                with torch.inference_mode(False):
                    entry = [torch.empty(numel, dtype=self.dtype, device=dev), None]
                ws[key] = entry
            self._entry = entry
        else:
            self._entry = [torch.empty(numel, dtype=self.dtype, device=dev), None]
        self.buf = self._entry[0][:numel].view(rows, n_pad)[:, : self.N]
        self._sig = (self.N, self.P, self.gh, self.gw, spec.sigma, spec.bias_scale, n_pad)
        self._tables: tuple[torch.Tensor, ...] | None = None

    def _factor_tables(self) -> tuple[torch.Tensor, ...]:
        if self._tables is None:
            dev, spec = self.spec.device, self.spec
            gy = gaussian_factors(self.gh, spec.sigma, device=dev) * spec.bias_scale  # [gh, gh] fp32
            gx = gaussian_factors(self.gw, spec.sigma, device=dev)  # [gw, gw] fp32
            t = torch.arange(self.N - self.P, device=dev)
            r_of, c_of = torch.div(t, self.gw, rounding_mode="floor"), t % self.gw
            self._tables = (gy.to(self.dtype), gx.to(self.dtype), r_of, c_of)
        return self._tables

    def fill_band(self, s: int, e: int, a: int, kr0: int, kr1: int) -> torch.Tensor:
        """``[e - s, b - a]`` bias for query rows ``[s, e)`` and the key tokens ``[a, b)`` of grid rows
        ``kr0..kr1`` (``a = 0`` when ``kr0 == 0``: the prefix key columns are included as zeros)."""
        pc = self.P if a == 0 else 0
        width = pc + (kr1 - kr0 + 1) * self.gw
        m = self.buf[: e - s, :width]
        sig = (self._sig, s, e, a, kr0, kr1)
        if self._entry[1] == sig:
            return m
        self._entry[1] = None
        gy, gx, r_of, c_of = self._factor_tables()
        P = self.P
        first_patch = max(s, P)
        if first_patch > s:
            m[: first_patch - s].zero_()
        if first_patch < e:
            if pc:
                m[first_patch - s :, :pc].zero_()
            ey = gy[:, kr0 : kr1 + 1].index_select(0, r_of[first_patch - P : e - P])
            ex = gx.index_select(0, c_of[first_patch - P : e - P])
            rows = m[first_patch - s :, pc:].unflatten(1, (kr1 - kr0 + 1, self.gw))
            torch.mul(ey[:, :, None], ex[:, None, :], out=rows)
        self._entry[1] = sig
        return m

    def fill(self, s: int, e: int) -> torch.Tensor:
        m = self.buf[: e - s]
        sig = (self._sig, s, e)
        if self._entry[1] == sig:
            return m
        self._entry[1] = None  # invalid while being written
        gy, gx, r_of, c_of = self._factor_tables()
        P = self.P
        first_patch = max(s, P)  # rows [s, first_patch) are prefix queries -> zero rows
        if first_patch > s:
            m[: first_patch - s].zero_()
        if first_patch < e:
            if P:
                m[first_patch - s :, :P].zero_()  # key columns of prefix tokens
            ey = gy.index_select(0, r_of[first_patch - P : e - P])  # [n, gh]
            ex = gx.index_select(0, c_of[first_patch - P : e - P])  # [n, gw]
            rows = m[first_patch - s :, P:].unflatten(1, (self.gh, self.gw))
            torch.mul(ey[:, :, None], ex[:, None, :], out=rows)
        self._entry[1] = sig
        return m


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _band(spec: AttentionSpec, s: int, e: int, R: int) -> tuple[int, int, int, int] | None:
    """Key-token range ``[a, b)`` (and grid rows ``kr0..kr1``) that needs the bias for query rows ``[s, e)``,
    or ``None`` when a plain full-width masked call is as good (band covers (almost) every key)."""
    P, N = spec.num_prefix_tokens, spec.N
    gh, gw = spec.grid_hw  # type: ignore[misc]
    if e <= P:
        return None  # prefix queries only (tiny chunks): the full path writes zero rows
    rq0, rq1 = (max(s, P) - P) // gw, (e - 1 - P) // gw
    kr0, kr1 = max(0, rq0 - R), min(gh - 1, rq1 + R)
    a = 0 if kr0 == 0 else P + kr0 * gw
    b = P + (kr1 + 1) * gw
    if a + (N - b) < N // 4:  # too few bias-free keys to pay for the extra calls and the merge
        return None
    return a, b, kr0, kr1


def _attend_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: list[tuple[int, int, torch.Tensor | None]],
    scale,
) -> torch.Tensor:
    """Softmax attention over the union of disjoint key ranges ``[a, b)`` (each with its own mask or None),
    merged exactly through the per-row log-sum-exps, in float32 and in place (one partial result alive)."""
    acc = lse = None
    for a, b, mask in ranges:
        o, l2 = _flash_cpu(q, k[:, :, a:b], v[:, :, a:b], attn_mask=mask, scale=scale)
        o = o.float()  # no copy for float32: o is this call's own output, safe to scale in place
        if acc is None:
            acc, lse = o, l2
            continue
        m = torch.logaddexp(lse, l2)
        acc.mul_(torch.exp(lse - m).unsqueeze(-1)).add_(o.mul_(torch.exp(l2 - m).unsqueeze(-1)))
        lse = m
    return acc


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """SDPA's fused kernels need a unit stride on the head dim; copy only when that is not the case."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    *,
    budget_bytes: int | None = None,
    min_rows: int = MIN_EFFICIENT_ROWS,
) -> torch.Tensor:
    """``softmax(scale * Q K^T + bias_scale * G) V`` for validated inputs (see ``gaussian_attention``).

    q, k, v: ``[B, H, N, D]`` of ``spec.dtype`` with arbitrary strides (views are passed to SDPA as they are;
    only a tensor whose head dim is not unit-stride is copied, since the fused kernels require it). Returns a
    contiguous ``[B, H, N, D]`` tensor of the input dtype. Extra memory: :func:`plan_chunks`
    (``budget_bytes``, ``min_rows``).
    """
    plan = plan_chunks(spec, budget_bytes, min_rows=min_rows)
    B, N = spec.B, spec.N
    C, bc = plan.q_chunk, plan.batch_chunk
    k_ = _unit_last(k)
    v_ = _unit_last(v)
    q_ = k_ if q is k else _unit_last(q)
    builder = _BiasBuilder(spec, C) if spec.has_bias else None
    if C == N:
        mask = builder.fill(0, N)[None, None] if builder is not None else None
        o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=spec.scale)
        return o.contiguous()  # no-op for [B, H, N, D]-ordered inputs; one copy for [B, N, H, D] views
    out = torch.empty(spec.B, spec.H, N, spec.D, dtype=spec.dtype, device=spec.device)
    # Band split (CPU): keys more than R grid rows away from every query row of the chunk get no bias (it is
    # below fp32 resolution, see band_radius), so they go through the faster unmasked kernel; the partial
    # results are merged exactly through their log-sum-exps.
    R = -2
    if builder is not None and spec.device.type == "cpu" and _flash_cpu is not None:
        R = band_radius(spec.sigma, spec.bias_scale)  # type: ignore[arg-type]
    for s in range(0, N, C):
        e = min(N, s + C)
        band = _band(spec, s, e, R) if R >= 0 else None
        if band is not None:
            a, b_, kr0, kr1 = band
            m = builder.fill_band(s, e, a, kr0, kr1)[None, None]
            for b0 in range(0, B, bc):
                b1 = min(B, b0 + bc)
                ranges = (
                    [(a, b_, m)] + ([(0, a, None)] if a > 0 else []) + ([(b_, N, None)] if b_ < N else [])
                )
                o = _attend_pieces(q_[b0:b1, :, s:e], k_[b0:b1], v_[b0:b1], ranges, spec.scale)
                out[b0:b1, :, s:e].copy_(o)
                del o
            continue
        mask = builder.fill(s, e)[None, None] if builder is not None else None
        if builder is not None and R == -1:
            mask = None  # |bias_scale| * G < 2^-24 everywhere: plain attention (same bound)
        for b0 in range(0, B, bc):
            b1 = min(B, b0 + bc)
            o = F.scaled_dot_product_attention(
                q_[b0:b1, :, s:e], k_[b0:b1], v_[b0:b1], attn_mask=mask, scale=spec.scale
            )
            out[b0:b1, :, s:e].copy_(o)
    return out
