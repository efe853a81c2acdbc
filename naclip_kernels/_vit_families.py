"""Which ViTs :func:`naclip_kernels.nn.patch_vit` supports and where their parts live.

Classes are recognised by module path + name (never by importing timm, open_clip or transformers), so this
module loads without them. :func:`resolve` maps a model to its blocks' attention slots, patch embedding
(for the grid pre-hook) and prefix-token count; :func:`attention_kind` says which adapter fits a slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "HF_ATTENTION",
    "TIMM_ATTENTION",
    "VitInfo",
    "attention_kind",
    "multihead_unsupported",
    "qualname",
    "require",
    "resolve",
]

TIMM_ATTENTION = {("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")}
TIMM_VIT = {("timm.models.vision_transformer", "VisionTransformer")}
OPEN_CLIP_VIT = {("open_clip.transformer", "VisionTransformer")}
OPEN_CLIP_ATTENTION = {("open_clip.transformer", "Attention")}
OPEN_CLIP_CLIP = {("open_clip.model", "CLIP"), ("open_clip.model", "CustomTextCLIP")}
HF_ATTENTION = {
    ("transformers.models.vit.modeling_vit", "ViTAttention"),
    ("transformers.models.clip.modeling_clip", "CLIPAttention"),
}
HF_VIT = {("transformers.models.vit.modeling_vit", "ViTModel")}
HF_CLIP_VISION = {("transformers.models.clip.modeling_clip", "CLIPVisionModel")}

SUPPORTED = (
    "timm VisionTransformer (timm Attention blocks), open_clip VisionTransformer (or an open_clip CLIP with "
    "one as .visual), Hugging Face ViTModel (or a model holding one as .vit) and CLIPVisionModel (or a "
    "CLIPModel / CLIPVisionModelWithProjection holding one as .vision_model)"
)


def qualname(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _is(obj: object, names: set[tuple[str, str]]) -> bool:
    kind = type(obj)
    return (kind.__module__, kind.__qualname__) in names


def require(obj: object, names: set[tuple[str, str]], arg: str) -> None:
    """``TypeError`` unless ``obj``'s exact class is one of ``names`` (subclasses may change forward)."""
    if not _is(obj, names):
        expected = " or ".join(sorted(f"{m}.{n}" for m, n in names))
        raise TypeError(f"{arg} must be a {expected}; got {qualname(obj)}")


def multihead_unsupported(mha: Any) -> list[str]:
    """Why ``mha`` (``nn.MultiheadAttention`` or open_clip ``Attention``) cannot be shared; ``[]``: it can."""
    if type(mha) is nn.MultiheadAttention:
        reasons = []
        if not mha._qkv_same_embed_dim:
            reasons.append("separate q/k/v projections (kdim/vdim != embed_dim)")
        if mha.bias_k is not None or mha.add_zero_attn:
            reasons.append("add_bias_kv / add_zero_attn")
    elif _is(mha, OPEN_CLIP_ATTENTION):
        reasons = []
        if mha.logit_scale is not None:
            reasons.append("scaled cosine attention (logit_scale)")
        if mha.head_scale is not None:
            reasons.append("per-head scaling (head_scale)")
    else:
        return ["expected torch.nn.MultiheadAttention or open_clip.transformer.Attention"]
    weight = getattr(mha, "in_proj_weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != 3 * weight.shape[1]:
        reasons.append("in_proj_weight is not a [3E, E] tensor")
    elif weight.shape[1] % mha.num_heads:
        reasons.append(f"embed_dim {weight.shape[1]} not divisible by num_heads {mha.num_heads}")
    if not isinstance(getattr(mha, "out_proj", None), nn.Linear):
        reasons.append("out_proj is not an nn.Linear")
    return reasons


def attention_kind(attn: nn.Module, *, where: str) -> str:
    """The adapter for one attention slot: ``"timm"``, ``"open_clip_mha"``, ``"open_clip_attention"`` or
    ``"hf"``; ``TypeError`` naming the class (and why) otherwise, e.g. for an already patched block."""
    if _is(attn, TIMM_ATTENTION):
        return "timm"
    if _is(attn, HF_ATTENTION):
        return "hf"
    if type(attn) is nn.MultiheadAttention or _is(attn, OPEN_CLIP_ATTENTION):
        reasons = multihead_unsupported(attn)
        if reasons:
            raise TypeError(f"{where}: cannot patch this {qualname(attn)}: {'; '.join(reasons)}")
        return "open_clip_mha" if type(attn) is nn.MultiheadAttention else "open_clip_attention"
    raise TypeError(
        f"{where}: attention is a {qualname(attn)} (already patched, or an attention variant that is not "
        "supported); supported: timm Attention, nn.MultiheadAttention / open_clip Attention, HF "
        "ViTAttention / CLIPAttention"
    )


def _conv_grid(conv: nn.Conv2d, images: Tensor) -> tuple[int, int]:
    """Output ``(h, w)`` of ``conv`` on ``images`` ``[..., H, W]`` (PyTorch's floor rule)."""
    out = []
    for axis, size in enumerate(images.shape[-2:]):
        k, s = conv.kernel_size[axis], conv.stride[axis]
        p, d = conv.padding[axis], conv.dilation[axis]
        out.append((int(size) + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def _timm_grid(patch_embed: nn.Module, images: Tensor) -> tuple[int, int]:
    gh, gw = patch_embed.dynamic_feat_size(tuple(int(s) for s in images.shape[-2:]))
    return int(gh), int(gw)


@dataclass(frozen=True)
class VitInfo:
    """``family``; ``attentions[i] = (parent, attribute)`` of block ``i``'s attention; ``embed``: the module
    whose input image gives the grid through ``grid_of(embed, image)``; ``num_prefix_tokens``."""

    family: str
    attentions: list[tuple[nn.Module, str]]
    embed: nn.Module
    grid_of: Callable[[nn.Module, Tensor], tuple[int, int]]
    num_prefix_tokens: int


def _timm(model: Any) -> VitInfo:
    embed = model.patch_embed
    if not hasattr(embed, "dynamic_feat_size"):
        raise TypeError(f"timm model's patch_embed is a {qualname(embed)} without dynamic_feat_size")
    slots = [(blk, "attn") for blk in model.blocks]
    return VitInfo("timm", slots, embed, _timm_grid, int(model.num_prefix_tokens))


def _open_clip(visual: Any) -> VitInfo:
    slots = [(blk, "attn") for blk in visual.transformer.resblocks]
    return VitInfo("open_clip", slots, visual.conv1, _conv_grid, 1)


def _hf_layers(model: Any, paths: tuple[str, ...]) -> nn.ModuleList:
    """The first of the dotted ``paths`` that exists (the layer list moved between transformers versions)."""
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TypeError(
        f"{qualname(model)} has none of the layer lists {paths} (unsupported transformers version)"
    )


def _hf_vit(model: Any) -> VitInfo:
    slots = [(layer, "attention") for layer in _hf_layers(model, ("layers", "encoder.layer"))]
    return VitInfo("hf_vit", slots, model.embeddings.patch_embeddings.projection, _conv_grid, 1)


def _hf_clip(model: Any) -> VitInfo:
    slots = [(layer, "self_attn") for layer in _hf_layers(model, ("encoder.layers", "layers"))]
    return VitInfo("hf_clip", slots, model.embeddings.patch_embedding, _conv_grid, 1)


def resolve(model: Any) -> VitInfo:
    """The :class:`VitInfo` of a supported model (wrappers are unwrapped); ``TypeError`` otherwise."""
    if _is(model, OPEN_CLIP_CLIP) and _is(getattr(model, "visual", None), OPEN_CLIP_VIT):
        model = model.visual
    if _is(getattr(model, "vit", None), HF_VIT):
        model = model.vit
    if _is(getattr(model, "vision_model", None), HF_CLIP_VISION):
        model = model.vision_model
    if _is(model, TIMM_VIT):
        return _timm(model)
    if _is(model, OPEN_CLIP_VIT):
        return _open_clip(model)
    if _is(model, HF_VIT):
        return _hf_vit(model)
    if _is(model, HF_CLIP_VISION):
        return _hf_clip(model)
    raise TypeError(f"patch_vit: unsupported model {qualname(model)}; supported: {SUPPORTED}")
