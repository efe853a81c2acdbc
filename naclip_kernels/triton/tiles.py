"""``@triton.jit`` helpers shared by the forward and backward kernels: tile loads, dots, the bias gather.

Table layout, the ``a_i - b_j`` index and the near-tile range are explained in ``docs/kernel.md``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def query_coords(offs_m, N, P, GH, GW):
    """Query-side table coordinate ``a_i = (r_i + gh - 1) * (2gw - 1) + c_i + gw - 1``, ``[BLOCK]`` int32.

    Prefix and out-of-range queries get the virtual row ``2gh - 1``: their offset to every key falls in the
    table's zero band (``G = 0`` on prefix rows without a mask).
    """
    t = offs_m - P
    patch = (t >= 0) & (offs_m < N)
    t = tl.where(patch, t, 0)
    r = t // GW
    c = t - r * GW
    r = tl.where(patch, r, 2 * GH - 1)
    c = tl.where(patch, c, 0)
    return (r + GH - 1) * (2 * GW - 1) + c + GW - 1


@triton.jit
def key_coords(offs_n, N, P, GH, GW):
    """Key-side table coordinate ``b_j = r_j * (2gw - 1) + c_j``, ``[BLOCK]`` int32.

    Prefix keys get the virtual row ``1 - 2gh`` (zero band), keys ``>= N`` the row ``1 - 4gh`` (the -inf band:
    the tail tile's padding columns are masked by the gather itself).
    """
    t = offs_n - P
    patch = (t >= 0) & (offs_n < N)
    t = tl.where(patch, t, 0)
    r = t // GW
    c = t - r * GW
    r = tl.where(patch, r, tl.where(offs_n < N, 1 - 2 * GH, 1 - 4 * GH))
    c = tl.where(patch, c, 0)
    return r * (2 * GW - 1) + c


@triton.jit
def gather(table, idx, N, GATHER_BRANCH: tl.constexpr):
    """``table[idx]`` (fp32, same shape as ``idx``), no exponential.

    ``GATHER_BRANCH`` puts the load in an always-taken runtime branch so that the software pipeliner does not
    stage it through shared memory (host choice per dtype and triton version, ``configs.use_gather_branch``).
    """
    if GATHER_BRANCH:
        if N > 0:  # noqa: SIM108 (a runtime branch, not a ternary, on purpose)
            val = tl.load(table + idx)
        else:
            val = tl.zeros(idx.shape, dtype=tl.float32)
    else:
        val = tl.load(table + idx)
    return val


@triton.jit
def near_range(start, N, P, GH, GW, R, n_full, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """Tokens ``[lo, hi)`` of the other axis, in whole ``BLOCK_OTHER`` tiles clamped to ``[0, n_full)``,
    that hold every patch within ``R`` grid rows of the patches among tokens ``[start, start + BLOCK)``.

    Symmetric in queries and keys (the grid distance is), so the forward / dQ kernels use it for the key
    tiles near a query block and the dK/dV kernel for the query tiles near a key block. ``R = -1``: none.
    """
    first = tl.maximum(start, P)
    last = tl.minimum(start + BLOCK, N) - 1
    r_lo = tl.maximum(first - P, 0) // GW
    r_hi = tl.maximum(last - P, 0) // GW
    row_lo = tl.maximum(r_lo - R, 0)
    row_hi = tl.minimum(r_hi + R, GH - 1)
    has_patch = first <= last
    tok_lo = tl.where(has_patch, P + row_lo * GW, 0)
    tok_hi = tl.where(has_patch, P + (row_hi + 1) * GW, 0)
    lo = tl.minimum((tok_lo // BLOCK_OTHER) * BLOCK_OTHER, n_full)
    hi = tl.minimum(tl.maximum(tl.cdiv(tok_hi, BLOCK_OTHER) * BLOCK_OTHER, lo), n_full)
    return lo, hi


@triton.jit
def load_rows(ptrs, rows, N, d_mask, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    """A ``[BLOCK, BLOCK_D]`` tile; rows ``>= N`` (only when ``MASK_ROWS``) and padded features read 0."""
    if MASK_ROWS:
        tile = tl.load(ptrs, mask=(rows < N)[:, None] & d_mask[None, :], other=0.0)
    elif PAD_D:
        tile = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` in fp32; IEEE fp32 products for fp32 inputs (no TF32), ``b``'s dtype otherwise."""
    if IEEE:  # noqa: SIM108 (constexpr branches read better than a ternary in a kernel)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b, acc)
    return acc


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32 (a fresh accumulator); IEEE fp32 products for fp32 inputs."""
    if IEEE:  # noqa: SIM108
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out
