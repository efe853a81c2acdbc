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
from ._layout import empty_output, in_output_layout
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


def mask_row_bytes(spec: AttentionSpec) -> int:
    """Bytes of one query row of the bias mask: ``N`` keys times the bias heads (1, or H when sigma or
    bias_scale is a per-head tensor) times the mask dtype's size; 0 without bias."""
    if not spec.has_bias:
        return 0
    per_head = any(isinstance(x, torch.Tensor) and x.numel() > 1 for x in (spec.sigma, spec.bias_scale))
    return spec.N * (spec.H if per_head else 1) * (8 if spec.dtype == torch.float64 else 4)


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
    spec: AttentionSpec, budget_bytes: int | None = None, *, min_rows: int | None = None
) -> ChunkPlan:
    """Choose the query chunk ``C`` and batch chunk for :func:`torch_attention`.

    ``C`` is the largest row count whose float32 ``[C, N]`` bias slice plus one ``[1, H, C, D]`` output chunk
    fit in ``budget_bytes`` (default :data:`DEFAULT_BUDGET_BYTES`), but at least ``min(min_rows, N)`` rows
    (SDPA efficiency floor; ``None``: :data:`MIN_EFFICIENT_ROWS`), rounded to 256-row blocks and balanced
    over ``ceil(N / C)`` chunks. The batch is
    split so that one output chunk of ``batch_chunk`` items fits in half the budget; with a single query chunk
    SDPA writes the final output directly (no chunk buffer, no batch split).
    Memory is therefore ``O(N * C)``; a full ``N x N`` buffer is requested only when it fits in the budget
    or ``N <= min_rows``.
    """
    if budget_bytes is None:
        budget_bytes = _env_budget()
    if min_rows is None:
        min_rows = MIN_EFFICIENT_ROWS
    budget = max(int(budget_bytes), 1)
    N, H, D, B = spec.N, spec.H, spec.D, spec.B
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    row_out = H * D * itemsize  # output bytes of one query row of one batch item
    row_mask = mask_row_bytes(spec)
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


@dataclass(frozen=True)
class BiasParams:
    """Host values of ``sigma`` / ``bias_scale`` (tensors read once per call): one entry, or one per head."""

    sigmas: tuple[float, ...]
    scales: tuple[float, ...]

    @property
    def heads(self) -> int:
        """1 when every head shares the bias, else H."""
        return len(self.sigmas)

    def radius(self) -> int:
        """The widest :func:`band_radius` over the heads."""
        return max(band_radius(s, b) for s, b in zip(self.sigmas, self.scales, strict=True))


def _host_values(x: float | torch.Tensor) -> tuple[float, ...]:
    return tuple(float(t) for t in x.detach().reshape(-1).tolist()) if isinstance(x, torch.Tensor) else (x,)


def bias_params(spec: AttentionSpec) -> BiasParams:
    """``spec``'s sigma and bias_scale as Python floats, broadcast to a common length (1 or H)."""
    sig, bs = _host_values(spec.sigma), _host_values(spec.bias_scale)  # type: ignore[arg-type]
    h = max(len(sig), len(bs))
    return BiasParams(sigmas=sig * (h // len(sig)), scales=bs * (h // len(bs)))


def mask_dtype(spec: AttentionSpec) -> torch.dtype:
    """dtype of the additive bias mask: float64 for float64 inputs, else float32 (CPU flash attention reads a
    float32 mask for every q dtype; CUDA SDPA gets a mask only for float32 inputs, see :func:`choose_impl`:
    half-precision CUDA inputs never get a half-precision bias)."""
    return torch.float64 if spec.dtype == torch.float64 else torch.float32


class _BiasBuilder:
    """Fills ``[h, C, n]`` slices of ``bias_scale * G`` (query rows ``[s, e)``, ``n <= cols`` keys of whole
    grid rows; h = 1 or H) into one reused buffer, contiguous on CPU.

    Per chunk and head: two row gathers from the 1-D factor tables (``[C, gh]``, ``[C, gw]``) and one
    broadcast multiply into the patch columns; zeros in the prefix columns and prefix rows. A cached buffer
    that already holds the requested slice (same grid, sigmas, bias_scales, rows) is returned as it is. The
    buffer is only ever read by kernels that run inside the same call (nothing autograd saves points to it).
    """

    def __init__(
        self, spec: AttentionSpec, rows: int, params: BiasParams | None = None, *, cols: int | None = None
    ) -> None:
        if spec.grid_hw is None or spec.sigma is None:  # excluded by check_inputs / has_bias
            raise ValueError("internal: the bias builder needs grid_hw and sigma")
        self.spec = spec
        self.params = bias_params(spec) if params is None else params
        self.P = spec.num_prefix_tokens
        self.gh, self.gw = spec.grid_hw
        self.N = spec.N
        dev = spec.device
        self.dtype = mask_dtype(spec)
        h = self.params.heads
        # rows padded to a multiple of 16 elements: aligned rows spare CUDA SDPA a padded copy of the mask
        width = self.N if cols is None else min(self.N, max(1, int(cols)))
        n_pad = -(-width // 16) * 16 if dev.type != "cpu" else width
        numel = h * rows * n_pad
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
        self._flat, self._h, self.width = self._entry[0][:numel], h, width
        self._sig = (self.N, self.P, self.gh, self.gw, self.params, dev.type == "cpu")
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _factor_tables(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Per head ``(bias_scale * gy, gx)`` in the mask dtype, and every patch token's grid row / column."""
        dev = self.spec.device
        if self._tables is None:
            self._tables = [
                (
                    (gaussian_factors(self.gh, sg, dtype=torch.float64, device=dev) * bs).to(self.dtype),
                    gaussian_factors(self.gw, sg, dtype=self.dtype, device=dev),
                )
                for sg, bs in zip(self.params.sigmas, self.params.scales, strict=True)
            ]
        t = torch.arange(self.N - self.P, device=dev)
        return self._tables, torch.div(t, self.gw, rounding_mode="floor"), t % self.gw

    def _write(self, m: torch.Tensor, s: int, e: int, pc: int, kr0: int, kr1: int) -> None:
        """Fill ``m`` ``[h, e - s, pc + (kr1 - kr0 + 1) * gw]``: zero prefix rows/columns, Gaussians."""
        tables, r_of, c_of = self._factor_tables()
        P = self.P
        first_patch = max(s, P)  # rows [s, first_patch) are prefix queries -> zero rows
        if first_patch > s:
            m[:, : first_patch - s].zero_()
        if first_patch >= e:
            return
        if pc:
            m[:, first_patch - s :, :pc].zero_()  # key columns of prefix tokens
        rows_r, rows_c = r_of[first_patch - P : e - P], c_of[first_patch - P : e - P]
        for h, (gy, gx) in enumerate(tables):
            ey = gy[:, kr0 : kr1 + 1].index_select(0, rows_r)  # [n, kr1 - kr0 + 1]
            ex = gx.index_select(0, rows_c)  # [n, gw]
            rows = m[h, first_patch - s :, pc:].unflatten(1, (kr1 - kr0 + 1, self.gw))
            torch.mul(ey[:, :, None], ex[:, None, :], out=rows)

    def fill_band(self, s: int, e: int, a: int, kr0: int, kr1: int) -> torch.Tensor:
        """``[h, e - s, b - a]`` bias for query rows ``[s, e)`` and the key tokens ``[a, b)`` of grid rows
        ``kr0..kr1`` (``a = 0`` when ``kr0 == 0``: the prefix key columns are included as zeros)."""
        pc = self.P if a == 0 else 0
        w = pc + (kr1 - kr0 + 1) * self.gw
        if w > self.width:
            raise ValueError(f"internal: a {w}-key mask block exceeds the builder's {self.width} columns")
        # CPU: one contiguous block per (rows, keys) request; CUDA: rows padded to 16 elements
        stride = w if self.spec.device.type == "cpu" else -(-w // 16) * 16
        m = self._flat[: self._h * (e - s) * stride].view(self._h, e - s, stride)[:, :, :w]
        sig = (self._sig, s, e, a, kr0, kr1)
        if self._entry[1] != sig:
            self._entry[1] = None  # invalid while being written
            self._write(m, s, e, pc, kr0, kr1)
            self._entry[1] = sig
        return m

    def fill(self, s: int, e: int) -> torch.Tensor:
        """``[h, e - s, N]`` bias for query rows ``[s, e)`` and every key."""
        return self.fill_band(s, e, 0, 0, self.gh - 1)


_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _band(spec: AttentionSpec, s: int, e: int, R: int) -> tuple[int, int, int, int] | None:
    """Key-token range ``[a, b)`` (and grid rows ``kr0..kr1``) that needs the bias for query rows ``[s, e)``,
    or ``None`` when a plain full-width masked call is as good (band covers (almost) every key)."""
    if R < 0:
        return None
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


def key_pieces(
    spec: AttentionSpec, builder: _BiasBuilder | None, s: int, e: int, R: int
) -> list[tuple[int, int, torch.Tensor | None]]:
    """The key ranges ``(a, b, mask)`` that query rows ``[s, e)`` attend to: the whole row with its mask
    (``None`` without bias, or when ``|bias_scale * G| < 2^-24`` everywhere, ``R == -1``), or the band with
    its mask plus the bias-free ranges left and right of it (see :func:`band_radius`). Masks are
    ``[1, h, e - s, b - a]`` views of the builder's buffer."""
    if builder is None or R == -1:
        return [(0, spec.N, None)]
    band = _band(spec, s, e, R)
    if band is None:
        return [(0, spec.N, builder.fill(s, e)[None])]
    a, b, kr0, kr1 = band
    out: list[tuple[int, int, torch.Tensor | None]] = [(a, b, builder.fill_band(s, e, a, kr0, kr1)[None])]
    if a > 0:
        out.append((0, a, None))
    if b < spec.N:
        out.append((b, spec.N, None))
    return out


def _attend_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: list[tuple[int, int, torch.Tensor | None]],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of disjoint key ranges ``[a, b)`` (each with its own mask or None),
    merged exactly through the per-row log-sum-exps, in float32 (float64 for float64) and in place (one
    partial result alive). Returns ``(out, lse)``; nothing here is seen by autograd."""
    acc = lse = None
    for a, b, mask in ranges:
        o, l2 = _flash_cpu(q, k[:, :, a:b], v[:, :, a:b], attn_mask=mask, scale=scale)
        o = o if o.dtype == torch.float64 else o.float()  # this call's own output: safe to scale in place
        if acc is None:
            acc, lse = o, l2
            continue
        m = torch.logaddexp(lse, l2)
        acc.mul_(torch.exp(lse - m).unsqueeze(-1)).add_(o.mul_(torch.exp(l2 - m).unsqueeze(-1)))
        lse = m
    return acc, lse  # type: ignore[return-value]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """SDPA's fused kernels need a unit stride on the head dim; copy only when that is not the case."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def unit_last_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v with a unit-stride head dim (copies only where needed; ``q is k`` is kept)."""
    k_, v_ = _unit_last(k), _unit_last(v)
    return (k_ if q is k else _unit_last(q)), k_, v_


_HALF = (torch.float16, torch.bfloat16)


def choose_impl(spec: AttentionSpec, k: torch.Tensor, *, needs_lse: bool = False) -> str:
    """Which kernel family runs these inputs: ``"flash"`` (CPU flash attention with log-sum-exp, band
    split), ``"sdpa"`` (``F.scaled_dot_product_attention``, no log-sum-exp) or ``"explicit"`` (chunked
    matmul + softmax in float32/float64, any device; see :mod:`naclip_kernels.torch_backward`).

    * CPU half precision with a non-finite key: CPU SDPA / flash attention turn rows that meet ``±inf`` into
      zeros, where float32 (and the Triton kernel) give NaN; the explicit float32 path keeps NaN.
    * CUDA half precision with a bias: the bias is built in float32 (``bias_scale * G`` would overflow float16
      beyond 65504 and round to 8 bits in bfloat16), so the explicit float32 path runs it.
    * ``needs_lse`` (autograd): SDPA does not return the log-sum-exp, so everything but CPU flash is explicit.
    """
    if spec.dtype in _HALF and spec.device.type == "cpu" and not bool(torch.isfinite(k).all()):
        return "explicit"
    if spec.device.type == "cpu" and _flash_cpu is not None:
        return "flash"
    if needs_lse or (spec.dtype in _HALF and spec.has_bias):
        return "explicit"
    return "sdpa"


def band_split_radius(spec: AttentionSpec, params: BiasParams | None, impl: str) -> int:
    """Band radius in grid rows for the band split (-1: the whole bias is below 2^-24; -2: no split). Only
    CPU flash attention can merge pieces, and float64 keeps every bias term (the split is exact to float32
    resolution, not to float64's)."""
    if params is None or impl != "flash" or spec.dtype == torch.float64:
        return -2
    return params.radius()


def _sdpa(q, k, v, mask, scale, want_lse: bool):
    if want_lse:
        o, lse = _flash_cpu(q, k, v, attn_mask=mask, scale=scale)
        return o, lse
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    *,
    budget_bytes: int | None = None,
    min_rows: int | None = None,
    with_lse: bool = False,
    impl: str | None = None,
):
    """``softmax(scale * Q K^T + bias_scale * G) V`` for validated inputs (see ``gaussian_attention``).

    q, k, v: ``[B, H, N, D]`` of ``spec.dtype`` with arbitrary (non-overlapping) strides (views are passed to
    SDPA as they are; only a tensor whose head dim is not unit-stride is copied, since the fused kernels
    require it). Returns a contiguous ``[B, H, N, D]`` tensor of the input dtype, or with ``with_lse`` the
    pair ``(out, lse)`` where ``lse`` is the per-row log-sum-exp ``[B, H, N]`` (natural log, float32;
    float64 for float64 inputs) that the backward needs. Extra memory: :func:`plan_chunks` (``budget_bytes``,
    ``min_rows``). ``impl`` overrides :func:`choose_impl` (tests). Runs no autograd itself.
    """
    impl = impl or choose_impl(spec, k, needs_lse=with_lse)
    if impl == "explicit":
        from .torch_backward import explicit_forward

        out, lse = explicit_forward(q, k, v, spec, budget_bytes=budget_bytes)
        return (out, lse) if with_lse else out
    plan = plan_chunks(spec, budget_bytes, min_rows=min_rows)
    B, N = spec.B, spec.N
    C, bc = plan.q_chunk, plan.batch_chunk
    q_, k_, v_ = unit_last_qkv(q, k, v)
    params = bias_params(spec) if spec.has_bias else None
    builder = _BiasBuilder(spec, C, params) if params is not None else None
    R = band_split_radius(spec, params, impl)
    lse_all = torch.empty(B, spec.H, N, dtype=_lse_dtype(spec), device=spec.device) if with_lse else None
    if C == N and (R < 0 or _band(spec, 0, N, R) is None):
        mask = None if builder is None or R == -1 else builder.fill(0, N)[None]
        o, lse = _sdpa(q_, k_, v_, mask, spec.scale, with_lse)
        o = in_output_layout(o, q)  # CPU flash returns token-major: a copy only for head-major q
        return (o, lse_all.copy_(lse)) if with_lse else o  # type: ignore[union-attr]
    out = empty_output(q)
    for s in range(0, N, C):
        e = min(N, s + C)
        pieces = key_pieces(spec, builder, s, e, R) if builder is not None else [(0, N, None)]
        for b0 in range(0, B, bc):
            b1 = min(B, b0 + bc)
            if len(pieces) == 1:
                o, lse = _sdpa(q_[b0:b1, :, s:e], k_[b0:b1], v_[b0:b1], pieces[0][2], spec.scale, with_lse)
            else:
                o, lse = _attend_pieces(q_[b0:b1, :, s:e], k_[b0:b1], v_[b0:b1], pieces, spec.scale)
            out[b0:b1, :, s:e].copy_(o)
            if lse_all is not None:
                lse_all[b0:b1, :, s:e].copy_(lse)
            del o, lse
    return (out, lse_all) if with_lse else out


def _lse_dtype(spec: AttentionSpec) -> torch.dtype:
    return torch.float64 if spec.dtype == torch.float64 else torch.float32
