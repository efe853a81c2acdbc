"""Building blocks shared by the method stages (:mod:`naclip.methods.resclip`, :mod:`naclip.methods.scclip`).

* :func:`run_blocks`: blocks ``0 .. L-2`` of a wrapped open_clip ViT (the same SDPA / stock dispatch as
  :class:`naclip.model.NaclipVisual`), optionally keeping every block output and the ``(q, k)`` of chosen
  blocks.
* :func:`last_block_attention` / :func:`finish_block`: the last block's ``ls_1(out_proj(attend(q, k, v)))`` on
  ``ln_1(x)`` with an arbitrary attention function, then the ``reduced`` (no residual / MLP) or ``vanilla``
  composition.
* :func:`chunked_dense_attention`: ``softmax(L) V`` for a data-dependent logit matrix ``L`` (an N x N bias the
  fused op cannot take), in query-row chunks so that at most :data:`DENSE_CHUNK_BYTES` of logits exist at
  once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from naclip.model import NaclipVisual, _run_block, _sdpa_block_forward, _sdpa_unsupported_reasons

__all__ = [
    "DENSE_CHUNK_BYTES",
    "check_qk_layers",
    "chunked_dense_attention",
    "finish_block",
    "last_block_attention",
    "run_blocks",
]

#: Upper bound of the float32 logit / probability buffers of one query-row chunk of
#: :func:`chunked_dense_attention` (3 buffers of ``[B, H, rows, T]``).
DENSE_CHUNK_BYTES = 256 << 20


def check_qk_layers(nv: NaclipVisual, layers: Collection[int], what: str) -> None:
    """``ValueError`` unless every index in ``layers`` is an intermediate block (``0 .. L-2``) that the SDPA
    block path reproduces (its ``q, k`` are then available without a second projection)."""
    blocks = nv.visual.transformer.resblocks
    for i in layers:
        if not 0 <= i < len(blocks) - 1:
            raise ValueError(f"{what}: block index {i} is not an intermediate block (0 .. {len(blocks) - 2})")
        reasons = _sdpa_unsupported_reasons(blocks[i])
        if reasons:
            raise ValueError(f"{what}: block {i} cannot expose its attention: {'; '.join(reasons)}")


def run_blocks(
    nv: NaclipVisual, x: Tensor, *, keep_outputs: bool = False, qk_layers: Collection[int] = ()
) -> tuple[Tensor, list[Tensor], dict[int, tuple[Tensor, Tensor]]]:
    """Blocks ``0 .. L-2`` on batch-first ``x`` ``[B, T, E]``.

    Returns ``(x, outputs, qk)``: the last intermediate output, every block output (``[B, T, E]`` each) when
    ``keep_outputs``, else ``[]``, and ``{i: (q_i, k_i)}`` (``[B, H, T, D]``) for ``i`` in ``qk_layers``
    (checked beforehand with :func:`check_qk_layers`).
    """
    transformer = nv.visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    outputs: list[Tensor] = []
    qk: dict[int, tuple[Tensor, Tensor]] = {}
    for i, block in enumerate(transformer.resblocks[:-1]):
        if i in qk_layers:
            got: list = []
            x = _sdpa_block_forward(block, x, got)
            qk[i] = got[0]
        else:
            x = _run_block(block, x, batch_first=batch_first)
        if keep_outputs:
            outputs.append(x)
    return x, outputs, qk


Attend = Callable[[Tensor | None, Tensor, Tensor], Tensor]


def last_block_attention(block: nn.Module, x: Tensor, attend: Attend, *, needs_query: bool) -> Tensor:
    """``ls_1(out_proj(attend(q, k, v)))`` with ``q, k, v`` ``[B, H, T, D]`` split from ``in_proj(ln_1(x))``.

    ``x``: ``[B, T, E]`` (any token layout; CLS handling is up to ``attend``). ``attend`` returns ``[B, H, T,
    D]``; heads are merged to channel ``h*D + j``. The Q rows of ``in_proj`` are skipped unless
    ``needs_query`` (``q`` is then ``None``).
    """
    attn = block.attn
    b, t, e = x.shape
    h = int(attn.num_heads)
    d = e // h
    y = block.ln_1(x)
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if needs_query:
        q, k, v = F.linear(y, weight, bias).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
    else:
        kv = F.linear(y, weight[e:], None if bias is None else bias[e:])
        k, v = kv.view(b, t, 2, h, d).permute(2, 0, 3, 1, 4)
        q = None
    out = attn.out_proj(attend(q, k, v).transpose(1, 2).reshape(b, t, e))
    ls_1 = getattr(block, "ls_1", None)
    return ls_1(out) if ls_1 is not None else out


def finish_block(block: nn.Module, x: Tensor, attn_out: Tensor, arch: str) -> Tensor:
    """``reduced``: ``attn_out``; ``vanilla``: ``x' = x + attn_out``, then ``x' + ls_2(mlp(ln_2(x')))``."""
    if arch == "reduced":
        return attn_out
    x = x + attn_out
    mlp_out = block.mlp(block.ln_2(x))
    ls_2 = getattr(block, "ls_2", None)
    return x + (ls_2(mlp_out) if ls_2 is not None else mlp_out)


def chunked_dense_attention(
    logits_rows: Callable[[int, int], Tensor], v: Tensor, heads_in_logits: int
) -> Tensor:
    """``softmax(L) V`` per head, ``L`` produced row block by row block.

    ``logits_rows(r0, r1)`` returns the float32 logits of query rows ``r0:r1``: ``[B, H', r1 - r0, T]`` with
    ``H'`` = ``heads_in_logits`` (``1`` broadcasts over the heads of ``v``). ``v``: ``[B, H, T, D]``. Returns
    ``[B, H, T, D]`` in ``v``'s dtype. Rows per chunk: ``DENSE_CHUNK_BYTES // (3 * 4 * B * H' * T)`` (at
    least 1), so the extra memory is ``O(DENSE_CHUNK_BYTES)`` besides whatever ``logits_rows`` keeps.
    """
    b, h, t, _ = v.shape
    rows = max(1, DENSE_CHUNK_BYTES // (12 * b * heads_in_logits * t))
    vf = v.float()
    outs = []
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        probs = torch.softmax(logits_rows(r0, r1), dim=-1)
        outs.append(torch.matmul(probs, vf))
    return torch.cat(outs, dim=2).to(v.dtype)
