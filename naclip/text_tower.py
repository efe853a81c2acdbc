"""Exact short-context text encoding for open_clip text towers (used by :func:`naclip.text.encode_queries`).

A CLIP text tower is causal (token ``i`` attends to tokens ``<= i``) and reads its feature at one position
``p`` of each prompt (the EOT token for ``argmax`` / ``eos`` pooling, ``0`` for ``first``). The output at
``p`` therefore does not depend on the tokens after ``p``: :class:`TextEncoder` runs the transformer on the
first ``L = max(p) + 1`` tokens of a batch only (token and positional embeddings sliced to ``L``, the causal
mask to ``[L, L]``), with prompts sorted by ``p`` so that a batch holds prompts of similar length. The result
is ``model.encode_text(tokens)`` up to float rounding (the same operations on fewer, unchanged positions).

The short path (``path == "short-context"``) is taken only when every part is a known open_clip class whose
arithmetic is position-wise apart from the masked attention; otherwise ``path == "full-context"`` and
``model.encode_text`` runs on the whole context (``reason`` says why). See ``docs/text-encoding.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import (
    CustomResidualAttentionBlock,
    ResidualAttentionBlock,
    TextTransformer,
    Transformer,
)

__all__ = ["FULL_CONTEXT", "SHORT_CONTEXT", "TextEncoder"]

SHORT_CONTEXT = "short-context"
FULL_CONTEXT = "full-context"
#: Pool types whose read position is known from the tokens alone (open_clip ``text_global_pool``).
_POSITIONAL_POOLS = ("argmax", "eos", "first")
_KNOWN_BLOCKS = (ResidualAttentionBlock, CustomResidualAttentionBlock)


@dataclass(frozen=True)
class _CausalTower:
    """The parts of a causal open_clip text tower, as ``encode_text`` uses them."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: Transformer
    attn_mask: torch.Tensor
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    pool_type: str
    eos_id: int | None


def _not_overridden(obj: object, base: type, name: str) -> bool:
    return getattr(type(obj), name) is getattr(base, name) and name not in vars(obj)


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    n = mask.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    m = mask.float()
    return bool(torch.isneginf(m[upper]).all() and (m[~upper] == 0).all())


def _parts(model: torch.nn.Module) -> tuple[dict | None, str]:
    if isinstance(model, CustomTextCLIP) and _not_overridden(model, CustomTextCLIP, "encode_text"):
        text = model.text
        if type(text) is not TextTransformer:
            return None, f"text tower {type(text).__name__} is not an open_clip TextTransformer"
        if text.cls_emb is not None:
            return None, "the tower appends a CLS token that attends to the whole context (CoCa-style)"
        if text.use_pad_mask or text.output_tokens:
            return None, "the tower masks padding (bi-directional) or returns its tokens"
        src, pool, eos = text, text.pool_type, text.eos_id
    elif isinstance(model, CLIP) and _not_overridden(model, CLIP, "encode_text"):
        src, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    else:
        return None, f"{type(model).__name__}.encode_text is not open_clip's CLIP / CustomTextCLIP one"
    parts = {
        "token_embedding": src.token_embedding,
        "positional_embedding": src.positional_embedding,
        "transformer": src.transformer,
        "attn_mask": src.attn_mask,
        "ln_final": src.ln_final,
        "text_projection": src.text_projection,
        "pool_type": pool,
        "eos_id": eos,
    }
    return parts, ""


def _inspect(model: torch.nn.Module) -> tuple[_CausalTower | None, str]:
    parts, reason = _parts(model)
    if parts is None:
        return None, reason
    if not _is_causal_mask(parts["attn_mask"]):
        return None, "the text attention is not causal (no causal mask)"
    if parts["pool_type"] not in _POSITIONAL_POOLS or (
        parts["pool_type"] == "eos" and parts["eos_id"] is None
    ):
        return None, f"pooling {parts['pool_type']!r} does not read one position fixed by the tokens"
    tr = parts["transformer"]
    if type(tr) is not Transformer or any(type(b) not in _KNOWN_BLOCKS for b in tr.resblocks):
        return None, f"transformer {type(tr).__name__} has blocks other than open_clip's residual ones"
    if parts["positional_embedding"].shape[0] != parts["attn_mask"].shape[0]:
        return None, "positional embedding and causal mask lengths differ"
    return _CausalTower(**parts), ""


def _pool_index(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """Position read by open_clip's ``text_global_pool`` for every row of ``tokens [B, C]`` (LongTensor)."""
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


class TextEncoder:
    """``encode(tokens [N, C]) -> [N, D]``, equal to ``model.encode_text(tokens)`` up to float rounding.

    ``path`` is :data:`SHORT_CONTEXT` or :data:`FULL_CONTEXT` (``reason`` says why the short path is not
    taken). ``max_tokens`` bounds ``rows x context`` of one transformer call (activation memory);
    ``max_rows`` bounds the rows of one call on the short path (smaller batches truncate closer to their own
    longest prompt).
    """

    def __init__(self, model: torch.nn.Module, *, max_tokens: int = 640 * 77, max_rows: int = 160) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self._tower, self.reason = _inspect(model)

    @property
    def path(self) -> str:
        return SHORT_CONTEXT if self._tower is not None else FULL_CONTEXT

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = self._tower
        if tower is None or tokens.shape[1] != tower.positional_embedding.shape[0]:
            rows = max(1, self.max_tokens // max(1, tokens.shape[1]))
            return torch.cat(
                [self.model.encode_text(tokens[i : i + rows]) for i in range(0, len(tokens), rows)]
            )
        pos = _pool_index(tokens, tower.pool_type, tower.eos_id)
        order = torch.argsort(pos, stable=True)
        out: list[torch.Tensor] = []
        start, n = 0, len(tokens)
        while start < n:
            stop = min(n, start + self.max_rows)
            length = int(pos[order[stop - 1]]) + 1
            stop = min(stop, start + max(1, self.max_tokens // length))
            length = int(pos[order[stop - 1]]) + 1
            sel = order[start:stop]
            out.append(self._forward(tower, tokens[sel, :length], pos[sel]))
            start = stop
        feats = torch.cat(out)
        return feats[torch.argsort(order)]

    @staticmethod
    def _forward(tower: _CausalTower, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:length].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x[torch.arange(len(tokens), device=x.device), pos])  # LayerNorm is per token
        proj = tower.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
