"""NACLIP dense features on an open_clip ``VisionTransformer`` (NACLIP spec section 1).

:class:`NaclipVisual` wraps (does not copy) an open_clip ``VisionTransformer`` and runs its own forward over
the tower's modules:

1. ``conv1`` (kernel = stride = patch ``P``; a side that is not a multiple of ``P`` loses its remainder,
   as the convolution floors: ``gh = H // P``, ``gw = W // P``) -> flatten row-major -> prepend
   ``class_embedding``.
2. ``+`` positional embedding: the stored one if ``T = 1 + gh*gw`` equals the pretrained token count,
   otherwise :meth:`NaclipVisual.interpolate_pos_embed` (the official ``(g + 0.1) / g0`` bicubic rule).
3. ``patch_dropout`` is never applied (inference); ``ln_pre`` is open_clip's own module. Blocks ``0 .. L-2``
   run :func:`_sdpa_block_forward` - the block's own math on its own parameters with
   ``F.scaled_dot_product_attention`` (no ``T x T`` attention matrix: open_clip's
   ``nn.MultiheadAttention`` fast path materialises it on CPU: 1.4 GB peak per ViT-B block at 4097 tokens,
   and one ``[12, T, T]`` fp32 buffer alone is 12.9 GB at 16385) - or, for a block with options that path
   does not reproduce (:func:`_sdpa_unsupported_reasons`), the block's own ``forward``
   (in the layout the transformer's ``batch_first`` setting asks for).
4. The last block per ``arch`` with the attention ``strategy`` (:mod:`naclip.strategies`):
   ``reduced``: ``x_out = ls_1(out_proj(attn(ln_1(x))))`` (no residual, no MLP);
   ``vanilla``: ``x = x + ls_1(out_proj(attn(ln_1(x))))``; ``x_out = x + ls_2(mlp(ln_2(x)))``.
   (``ls_1``/``ls_2`` are LayerScale modules if the model has them, identity for CLIP.) q/k/v come from
   the block's packed ``attn.in_proj_weight`` / ``attn.in_proj_bias`` (rows ``[q | k | v]``) and
   ``attn.out_proj``, which both ``nn.MultiheadAttention`` and open_clip's ``Attention`` expose;
   strategies that do not use Q (``naclip``, ``kk``) skip the Q rows of the projection entirely.
5. ``ln_post`` on **all** tokens, then ``@ proj`` -> ``[B, 1 + gh*gw, output_dim]`` (token 0 = CLS,
   patch token ``1 + r*gw + c``; not L2-normalised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import (
    Attention,
    CustomResidualAttentionBlock,
    LayerScale,
    ResidualAttentionBlock,
    VisionTransformer,
)
from torch import Tensor, nn

from naclip._validate import check_positive_int, unwrap_int
from naclip.strategies import get_strategy, validate_config
from naclip_kernels.nn import GaussianAttention

__all__ = ["NaclipVisual"]


def _is_identity(module: object) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _attn_unsupported(attn: nn.Module) -> list[str]:
    """Attention options neither NACLIP's last block nor the SDPA block path reproduce (``[]`` when none).

    Accepted: ``nn.MultiheadAttention`` with packed ``in_proj`` (``kdim == vdim == embed_dim``), no
    ``add_bias_kv`` / ``add_zero_attn``; open_clip ``Attention`` without scaled cosine attention
    (``logit_scale``), ``qk_norm`` (``ln_q`` / ``ln_k``), per-head scaling (``head_scale``) or an inner norm
    (``ln_inner``). Both need a plain-tensor ``in_proj_weight`` ``[3E, E]`` with ``E % num_heads == 0``, an
    optional tensor ``in_proj_bias`` and an ``nn.Linear`` ``out_proj``.
    """
    reasons: list[str] = []
    if isinstance(attn, nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim:
            reasons.append("nn.MultiheadAttention with separate q/k/v projections (kdim/vdim != embed_dim)")
        if attn.bias_k is not None or attn.add_zero_attn:
            reasons.append("nn.MultiheadAttention with add_bias_kv / add_zero_attn")
    elif isinstance(attn, Attention):
        if attn.logit_scale is not None:
            reasons.append("scaled cosine attention (logit_scale)")
        if not _is_identity(attn.ln_q) or not _is_identity(attn.ln_k):
            reasons.append("qk_norm (ln_q / ln_k)")
        if attn.head_scale is not None:
            reasons.append("per-head scaling (scale_heads: head_scale)")
        if not _is_identity(attn.ln_inner):
            reasons.append("inner norm (scale_attn_inner: ln_inner)")
    else:
        return [
            f"attention is a {type(attn).__name__}, expected nn.MultiheadAttention or open_clip's Attention"
        ]
    weight, bias = getattr(attn, "in_proj_weight", None), getattr(attn, "in_proj_bias", None)
    if not isinstance(weight, Tensor) or not (bias is None or isinstance(bias, Tensor)):
        reasons.append("in_proj_weight / in_proj_bias are not plain tensors")
    elif weight.ndim != 2 or weight.shape[0] != 3 * weight.shape[1] or weight.shape[1] % attn.num_heads:
        reasons.append(f"in_proj_weight has shape {tuple(weight.shape)}, not [3E, E] with E % heads == 0")
    if not isinstance(getattr(attn, "out_proj", None), nn.Linear):
        reasons.append("out_proj is not an nn.Linear")
    return reasons


def _check_last_block(block: nn.Module) -> None:
    """Raise ``ValueError`` when the last block has parts the NACLIP forward cannot reproduce."""
    where = "visual.transformer.resblocks[-1]"
    for name in ("ln_1", "attn", "ln_2", "mlp"):
        if not hasattr(block, name):
            raise ValueError(
                f"{where} ({type(block).__name__}) has no '{name}'; expected a pre-LN CLIP block"
            )
    if not _is_identity(getattr(block, "ln_attn", None)):
        raise ValueError(
            f"{where} has an 'ln_attn' norm after attention (open_clip scale_attn=True); NACLIP's "
            "modified last block is defined for CLIP blocks without it (unsupported model)"
        )
    reasons = _attn_unsupported(block.attn)
    if reasons:
        raise ValueError(
            f"{where}.attn: expected a plain CLIP attention NACLIP can reproduce, got {'; '.join(reasons)}"
        )


def _sdpa_unsupported_reasons(block: nn.Module) -> list[str]:
    """Why :func:`_sdpa_block_forward` cannot stand in for ``block.forward`` exactly (``[]`` when it can).

    The SDPA path reproduces exactly open_clip's ``ResidualAttentionBlock`` (``nn.MultiheadAttention``
    with packed ``in_proj``) and ``CustomResidualAttentionBlock`` (open_clip ``Attention``) as used by a
    ``VisionTransformer`` (no attention mask). Anything else takes the block's own forward, for one of
    these reasons:

    * another block class (a subclass may override ``forward``), or forward hooks on the block (they
      would be skipped);
    * cross-attention (``ln_1_kv``); an ``ln_attn`` norm after attention (``scale_attn``);
    * the attention options of :func:`_attn_unsupported` (separate q/k/v projections, ``add_bias_kv`` /
      ``add_zero_attn``, scaled cosine attention, ``qk_norm``, per-head scaling, an inner norm,
      non-tensor (e.g. quantised) projection weights);
    * ``ls_1`` / ``ls_2`` that are neither ``nn.Identity`` nor open_clip ``LayerScale``;
    * attention dropout ``> 0`` in training mode.
    """
    reasons: list[str] = []
    kind = type(block)
    if kind not in (ResidualAttentionBlock, CustomResidualAttentionBlock):
        name = f"{kind.__module__}.{kind.__name__}"
        return [f"block class {name} is not open_clip's (Custom)ResidualAttentionBlock"]
    if block._forward_hooks or block._forward_pre_hooks:
        reasons.append("forward hooks are registered on the block")
    if hasattr(block, "ln_1_kv"):
        reasons.append("cross-attention block (ln_1_kv)")
    if not _is_identity(getattr(block, "ln_attn", None)):
        reasons.append("ln_attn norm after attention (scale_attn)")
    for name in ("ls_1", "ls_2"):
        ls = getattr(block, name, None)
        if not (_is_identity(ls) or type(ls) is LayerScale):
            reasons.append(f"{name} is a {type(ls).__name__}, not nn.Identity / open_clip LayerScale")
    attn = block.attn
    reasons.extend(_attn_unsupported(attn))
    mha_dropout = isinstance(attn, nn.MultiheadAttention) and attn.dropout > 0
    oc_dropout = isinstance(attn, Attention) and (attn.attn_drop.p > 0 or attn.out_drop.p > 0)
    if block.training and (mha_dropout or oc_dropout):
        reasons.append("attention dropout in training mode")
    return reasons


def _run_block(block: nn.Module, x: Tensor, *, batch_first: bool) -> Tensor:
    """One open_clip residual block on batch-first ``x`` ``[B, T, E]``: :func:`_sdpa_block_forward` where it
    is exact, else the block itself (``batch_first=False``: NLD -> LND for the block, as open_clip's
    Transformer does)."""
    if not _sdpa_unsupported_reasons(block):
        return _sdpa_block_forward(block, x)
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def _sdpa_block_forward(block: nn.Module, x: Tensor, qk_out: list | None = None) -> Tensor:
    """One pre-LN CLIP block on batch-first tokens ``x`` ``[B, T, E]`` -> ``[B, T, E]`` (same dtype).

    Exactly the block's own math, on its own parameters (only for blocks where
    :func:`_sdpa_unsupported_reasons` is empty)::

        y = ln_1(x); [q | k | v] = y @ in_proj_weight.T + in_proj_bias   # [B, T, 3E], heads h*D + j
        a = softmax(q k^T / sqrt(D)) v per head                             # F.scaled_dot_product_attention
        x = x + ls_1(out_proj(a));  x = x + ls_2(mlp(ln_2(x)))

    q, k, v are strided ``[B, H, T, D]`` views of the one ``in_proj`` output (no copies). On CPU SDPA runs
    its flash kernel (tiled online softmax), so no ``T x T`` buffer exists; memory is ``O(T*E)`` apart from
    the MLP hidden ``[B, T, mlp_width]``. Prefix (CLS) tokens are ordinary tokens here, as in open_clip.
    ``qk_out``: a list to which ``(q, k)`` of this block (``[B, H, T, D]`` views) are appended (ResCLIP's RCS
    reuses the attention of intermediate blocks, :mod:`naclip.methods.resclip`).
    """
    attn = block.attn
    b, t, e = x.shape
    h = int(attn.num_heads)
    d = e // h
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # [B, T, 3E]
    q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, H, T, D], strided views
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D]
    if qk_out is not None:
        qk_out.append((q, k))
    del qkv, q, k, v
    out = attn.out_proj(out.transpose(1, 2).reshape(b, t, e))  # merge heads: channel h*D + j
    x = x + block.ls_1(out)
    del out
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _grid_ints(name: str, value: object) -> int:
    """A positive grid size: ``int`` or numpy / 0-d tensor integer -> ``int``; ``TypeError`` for another
    type (bool, float, str ...), ``ValueError`` for ``< 1``."""
    return check_positive_int(name, unwrap_int(value))


class NaclipVisual(nn.Module):
    """NACLIP dense image features from an open_clip ``VisionTransformer`` (weights shared, not copied).

    Args:
        visual: ``open_clip.transformer.VisionTransformer`` (e.g. ``clip_model.visual`` of an open_clip
            ViT CLIP). Towers from timm, ``ModifiedResNet`` or attention-pooling (CoCa) models raise
            ``TypeError`` / ``ValueError``.
        arch: last-block architecture, ``"reduced"`` (NACLIP) or ``"vanilla"``.
        strategy: attention strategy name in :data:`naclip.strategies.STRATEGIES`
            (``naclip``, ``nonly``, ``kk``, ``vanilla``, ``csa``).
        gaussian_std: Gaussian std in **patch units** (``> 0`` for ``naclip`` / ``nonly``; ignored otherwise).
        backend: ``naclip_kernels`` backend (``None`` = its global default, ``"auto"``, ``"torch"``,
            ``"triton"``, ``"reference"``).

    ``forward(images)``: ``images`` ``[B, 3, H, W]`` normalised floating tensor (cast to the weights'
    dtype) -> ``[B, 1 + gh*gw, output_dim]`` in the weights' dtype, ``gh = H // P``, ``gw = W // P``;
    token 0 = CLS.
    ``NACLIP`` itself is ``arch="reduced", strategy="naclip", gaussian_std=5``.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        *,
        arch: str = "reduced",
        strategy: str = "naclip",
        gaussian_std: float = 5.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                "visual must be an open_clip VisionTransformer (a CLIP ViT image tower, e.g. "
                f"model.visual); got {type(visual).__module__}.{type(visual).__name__} (timm, "
                "ModifiedResNet and other towers are not supported)"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(
                "visual uses attentional pooling (CoCa-style); NACLIP needs a CLIP ViT with ln_post/proj"
            )
        conv = visual.conv1
        if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.in_channels != 3:
            raise ValueError(
                "visual.conv1 must be a patch embedding (kernel == stride, no padding, 3 input "
                f"channels); got kernel={conv.kernel_size}, stride={conv.stride}, "
                f"padding={conv.padding}, in_channels={conv.in_channels}"
            )
        blocks = visual.transformer.resblocks
        if len(blocks) < 1:
            raise ValueError("visual.transformer has no residual blocks")
        _check_last_block(blocks[-1])
        self.visual = visual
        self._pretrained_grid = self._infer_pretrained_grid(visual)
        self.arch = "reduced"
        self.strategy = "naclip"
        self.gaussian_std: float | None = 5.0
        self.set_params(arch=arch, strategy=strategy, gaussian_std=gaussian_std)
        self.backend = backend

    # ------------------------------------------------------------------ configuration
    @property
    def backend(self) -> str | None:
        """``naclip_kernels`` backend for the last-block attention (``None`` = the global default)."""
        return self._backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"backend must be None or a backend name string; got {type(value).__name__} {value!r}"
            )
        self._backend = value

    def set_params(
        self, arch: str | None = None, strategy: str | None = None, gaussian_std: float | None = None
    ) -> None:
        """Change ``arch`` / ``strategy`` / ``gaussian_std`` (``None`` keeps the current value).

        Validated together as in the official ``set_params`` (see
        :func:`naclip.strategies.validate_config`); on error nothing changes. Takes effect on the next
        forward: nothing derived from these values is cached (the Gaussian bias is computed inside the
        kernel from token indices).
        """
        new_arch = self.arch if arch is None else arch
        new_strategy = self.strategy if strategy is None else strategy
        new_std = self.gaussian_std if gaussian_std is None else gaussian_std
        checked = validate_config(new_arch, new_strategy, new_std)
        self.arch, self.strategy = new_arch, new_strategy
        self.gaussian_std = checked if checked is not None else new_std

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, strategy={self.strategy!r}, gaussian_std={self.gaussian_std!r}, "
            f"backend={self.backend!r}, patch_size={self.patch_size}, pretrained_grid={self.pretrained_grid}"
        )

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def _infer_pretrained_grid(visual: VisionTransformer) -> tuple[int, int]:
        pe = visual.positional_embedding
        if pe.ndim != 2:
            raise ValueError(
                f"visual.positional_embedding must be [1 + N, width]; got shape {tuple(pe.shape)}"
            )
        n = pe.shape[0] - 1
        grid = tuple(int(g) for g in getattr(visual, "grid_size", (0, 0)))
        if len(grid) == 2 and grid[0] * grid[1] == n:
            return grid  # type: ignore[return-value]
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(
                "cannot infer the pretrained patch grid: positional_embedding has "
                f"{n} patch rows, grid_size={grid}"
            )
        return (g, g)

    @property
    def patch_size(self) -> tuple[int, int]:
        """``(P_h, P_w)`` of the patch embedding."""
        return tuple(int(p) for p in self.visual.conv1.kernel_size)  # type: ignore[return-value]

    @property
    def pretrained_grid(self) -> tuple[int, int]:
        """Patch grid ``(gh0, gw0)`` of the stored positional embedding (``(14, 14)`` for ViT-B/16 @ 224)."""
        return self._pretrained_grid

    @property
    def output_dim(self) -> int:
        """Channels of the dense output (``proj`` columns; the width if the model has no ``proj``)."""
        proj = self.visual.proj
        return int(proj.shape[1]) if proj is not None else int(self.visual.conv1.out_channels)

    @property
    def width(self) -> int:
        """Transformer width ``E``."""
        return int(self.visual.conv1.out_channels)

    @property
    def num_heads(self) -> int:
        """Heads of the last block's attention."""
        return int(self.visual.transformer.resblocks[-1].attn.num_heads)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(H // P_h, W // P_w)`` of an ``H x W`` image (conv floor semantics)."""
        ph, pw = self.patch_size
        return (int(height) // ph, int(width) // pw)

    def interpolate_pos_embed(self, gh: int, gw: int) -> Tensor:
        """Positional embedding for a ``gh x gw`` patch grid: ``[1, 1 + gh*gw, width]`` in the stored dtype.

        If ``1 + gh*gw`` equals the stored token count the stored embedding is returned as is - also for
        a non-square grid with exactly ``gh0*gw0`` patches (e.g. 7x28 at a 14x14 pretrained grid), whose
        layout is then wrong: this reproduces the official quirk (spec section 1.4). Otherwise the patch
        part is resampled exactly like the official code::

            F.interpolate(pe[1:].reshape(1, gh0, gw0, E).permute(0, 3, 1, 2), mode="bicubic",
                          scale_factor=((gh + 0.1) / gh0, (gw + 0.1) / gw0), align_corners=False,
                          recompute_scale_factor=False)

        (computed in float32), flattened row-major, and the CLS row is copied. The scale factor, not the
        output size, drives the sampling grid, so this differs from size-based resampling (open_clip /
        timm).
        """
        gh, gw = _grid_ints("gh", gh), _grid_ints("gw", gw)
        pe = self.visual.positional_embedding
        if 1 + gh * gw == pe.shape[0]:
            return pe.unsqueeze(0)
        gh0, gw0 = self.pretrained_grid
        width = pe.shape[1]
        patch = pe[1:].float().reshape(1, gh0, gw0, width).permute(0, 3, 1, 2)
        patch = F.interpolate(
            patch,
            scale_factor=((gh + 0.1) / gh0, (gw + 0.1) / gw0),
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
        if tuple(patch.shape[-2:]) != (gh, gw):  # cannot happen for floor(g0*(g+0.1)/g0) == g; guard anyway
            raise RuntimeError(
                f"positional-embedding interpolation gave {tuple(patch.shape[-2:])}, not {(gh, gw)}"
            )
        patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, width).to(pe.dtype)
        return torch.cat([pe[:1].unsqueeze(0), patch], dim=1)

    # ------------------------------------------------------------------ forward pieces
    def _check_images(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W]; got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W]; got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a normalised floating tensor; got dtype {images.dtype}")
        if images.shape[0] < 1:
            raise ValueError(f"images must hold at least one image; got shape {tuple(images.shape)}")
        weight = self.visual.conv1.weight
        if images.device != weight.device:
            raise ValueError(f"images are on {images.device} but the model is on {weight.device}")
        ph, pw = self.patch_size
        if images.shape[2] < ph or images.shape[3] < pw:
            raise ValueError(
                f"images of {images.shape[2]}x{images.shape[3]} pixels are smaller than one {ph}x{pw} patch"
            )
        return images.to(weight.dtype)

    def _embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        v = self.visual
        x = v.conv1(self._check_images(images))  # [B, E, gh, gw]; conv floors any remainder
        b, e, gh, gw = x.shape
        x = x.reshape(b, e, gh * gw).permute(0, 2, 1)  # [B, N, E], row-major tokens
        cls = v.class_embedding.to(x.dtype).view(1, 1, e).expand(b, 1, e)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + N, E]
        x = x + self.interpolate_pos_embed(gh, gw).to(x.dtype)
        # patch_dropout is skipped: it only acts in training mode, and never on dense inference.
        return v.ln_pre(x), (gh, gw)

    def _run_blocks(self, x: Tensor) -> Tensor:
        """Blocks ``0 .. L-2`` on batch-first ``x`` ``[B, T, E]``: the SDPA path where exact, else stock."""
        transformer = self.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        for block in transformer.resblocks[:-1]:
            x = _run_block(block, x, batch_first=batch_first)
        return x

    def last_block_input(self, images: Tensor) -> Tensor:
        """Output of blocks ``0 .. L-2`` (input of the modified last block): ``[B, 1 + gh*gw, width]``."""
        x, _ = self._embed(images)
        return self._run_blocks(x)

    def forward_last_block(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """The modified last block on batch-first tokens ``x`` ``[B, 1 + gh*gw, width]`` -> same shape.

        ``reduced``: ``ls_1(out_proj(attn(ln_1(x))))``; ``vanilla``: ``x + ls_1(out_proj(attn(ln_1(x))))``
        followed by ``+ ls_2(mlp(ln_2(.)))``. ``attn`` is the configured strategy; heads are split from
        and merged back to channel ``h*d + j``. Only the K and V rows of ``in_proj`` are applied when the
        strategy does not use Q.
        """
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise ValueError(f"x must be a [B, T, width] tensor; got {getattr(x, 'shape', type(x).__name__)}")
        if isinstance(grid_hw, str | bytes) or not isinstance(grid_hw, tuple | list | torch.Size):
            raise TypeError(f"grid_hw must be a (gh, gw) tuple of positive ints; got {grid_hw!r}")
        if len(grid_hw) != 2:
            raise ValueError(f"grid_hw must be a (gh, gw) tuple of positive ints; got {grid_hw!r}")
        gh, gw = _grid_ints("grid_hw[0]", grid_hw[0]), _grid_ints("grid_hw[1]", grid_hw[1])
        b, t, e = x.shape
        if t != 1 + gh * gw:
            raise ValueError(f"x has {t} tokens but grid_hw={(gh, gw)} needs 1 + {gh}*{gw} = {1 + gh * gw}")
        block = self.visual.transformer.resblocks[-1]
        attn = block.attn
        h = int(attn.num_heads)
        if e % h or e != attn.in_proj_weight.shape[1]:
            raise ValueError(
                f"x width {e} does not match the last block (in_proj {tuple(attn.in_proj_weight.shape)})"
            )
        strategy = get_strategy(self.strategy)
        # One head split / merge for every strategy: a GaussianAttention sharing the block's in_proj/out_proj.
        heads = GaussianAttention.from_multihead(attn, sigma=None)
        q, k, v = heads.project_heads(block.ln_1(x), with_query=strategy.needs_query)  # [B, H, T, D] views
        out = strategy(q, k, v, (gh, gw), self.gaussian_std, self.backend)  # [B, H, T, D]
        out = heads.merge_heads(out)  # channel h*d + j, then out_proj
        ls_1 = getattr(block, "ls_1", None)
        if ls_1 is not None:
            out = ls_1(out)
        if self.arch == "reduced":
            return out
        x = x + out
        mlp_out = block.mlp(block.ln_2(x))
        ls_2 = getattr(block, "ls_2", None)
        if ls_2 is not None:
            mlp_out = ls_2(mlp_out)
        return x + mlp_out

    def project(self, x: Tensor) -> Tensor:
        """``ln_post(x) @ proj`` on every token: ``[B, T, width]`` -> ``[B, T, output_dim]``."""
        x = self.visual.ln_post(x)
        proj = self.visual.proj
        return x @ proj if proj is not None else x

    def forward(self, images: Tensor) -> Tensor:
        """Dense features ``[B, 1 + gh*gw, output_dim]`` (token 0 = CLS; not L2-normalised)."""
        x, grid = self._embed(images)
        x = self._run_blocks(x)
        x = self.forward_last_block(x, grid)
        return self.project(x)
