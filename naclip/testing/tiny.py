"""Build the tiny open_clip ``VisionTransformer`` described by a golden-fixture manifest.

The manifest's ``"model"`` block (``../shared/reference/fixtures/manifest.json``) describes a random tiny CLIP
ViT built by the official ``build_model()``: ``width``, ``layers``, ``heads``, ``patch_size``,
``input_resolution``, ``output_dim``, optional ``mlp_ratio`` (default 4) and ``layernorm_eps`` (default 1e-5);
QuickGELU activation, pre-LN blocks, ``nn.MultiheadAttention`` with packed ``in_proj``. Weights use OpenAI
CLIP key names (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

from naclip._validate import check_positive_int

__all__ = ["build_visual_from_manifest"]

_REQUIRED = ("width", "layers", "heads", "patch_size", "input_resolution", "output_dim")


def _positive_int(model_cfg: Mapping[str, Any], key: str) -> int:
    return check_positive_int(f"model_cfg[{key!r}]", model_cfg[key])


def build_visual_from_manifest(
    model_cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> VisionTransformer:
    """Return an eval-mode float32 open_clip ``VisionTransformer`` with the fixture weights loaded (strict).

    ``model_cfg``: the manifest ``"model"`` block (keys ``width, layers, heads, patch_size, input_resolution,
    output_dim`` required; ``mlp_ratio`` default 4.0, ``layernorm_eps`` default 1e-5; ``head_dim`` if present
    is checked against ``width / heads``, never assumed). ``state_dict``: visual-tower tensors, with or
    without the ``visual.`` prefix (keys of other towers are ignored). Missing or unexpected visual keys, or
    shape mismatches, raise ``ValueError`` listing them.
    """
    if not isinstance(model_cfg, Mapping):
        raise TypeError(
            f"model_cfg must be a mapping (the manifest 'model' block); got {type(model_cfg).__name__}"
        )
    missing_cfg = [k for k in _REQUIRED if k not in model_cfg]
    if missing_cfg:
        raise ValueError(f"model_cfg lacks required keys {missing_cfg}; got keys {sorted(model_cfg)}")
    width, layers, heads, patch, res, out_dim = (_positive_int(model_cfg, k) for k in _REQUIRED)
    if width % heads:
        raise ValueError(f"model_cfg['width'] ({width}) must be divisible by model_cfg['heads'] ({heads})")
    head_dim = model_cfg.get("head_dim")
    if head_dim is not None and head_dim * heads != width:
        raise ValueError(
            f"model_cfg['head_dim'] ({head_dim}) != width / heads ({width} / {heads} = {width // heads})"
        )
    if res < patch:
        raise ValueError(f"model_cfg['input_resolution'] ({res}) is smaller than patch_size ({patch})")
    mlp_ratio = float(model_cfg.get("mlp_ratio", 4.0))
    eps = float(model_cfg.get("layernorm_eps", 1e-5))

    visual = VisionTransformer(
        image_size=res,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=heads,
        mlp_ratio=mlp_ratio,
        output_dim=out_dim,
        act_layer=QuickGELU,
        norm_layer=functools.partial(LayerNorm, eps=eps),
    )

    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors; got {type(state_dict).__name__}")
    has_prefix = any(k.startswith("visual.") for k in state_dict)
    sd = (
        {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
        if has_prefix
        else dict(state_dict)
    )
    expected = visual.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)}"
        for k in sorted(set(expected) & set(sd))
        if tuple(expected[k].shape) != tuple(sd[k].shape)
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(
            "state_dict does not match the manifest model config "
            f"(width={width}, layers={layers}, heads={heads}, patch_size={patch}, input_resolution={res}, "
            f"output_dim={out_dim}): missing={missing[:8]}, unexpected={unexpected[:8]}, "
            f"shape={bad_shape[:8]}"
        )
    visual.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return visual.eval()
