"""Drop-in Gaussian-neighbourhood attention: the :class:`GaussianAttention` module and :func:`patch_vit`.

``GaussianAttention(dim, num_heads, ...)`` has timm's layout (``qkv: Linear(dim, 3*dim)``, ``proj: Linear(dim,
dim)``) and computes, per head, ``softmax(scale * Q K^T + bias_scale * G(sigma)) V`` through
:func:`naclip_kernels.gaussian_attention` (``G`` is 0 on the ``num_prefix_tokens`` prefix rows/columns).
``patch_vit(model, sigma=...)`` swaps that module into the blocks of a timm, open_clip or Hugging Face ViT
(sharing the weights), taking the patch grid from each forward's input; ``handle.remove()`` undoes it.
timm / open_clip / transformers are never imported here at module import. Design notes: ``docs/nn.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _vit_families as fam
from ._checks import check_grid, check_prefix, check_sigma
from .api import BACKENDS, gaussian_attention

__all__ = ["SIGMA_FLOOR", "GaussianAttention", "PatchHandle", "QKVSplit", "patch_vit"]

#: Lower bound (grid cells) of a learnable sigma in the forward (:meth:`GaussianAttention.sigma_value`).
SIGMA_FLOOR = 1e-2


def _check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise (TypeError if not isinstance(value, numbers.Real) or isinstance(value, bool) else ValueError)(
            f"{name} must be a finite number; got {type(value).__name__} {value!r}"
        )
    return float(value)


def _check_backend(backend: Any) -> str | None:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(
            f"backend must be None or one of {BACKENDS}; got {type(backend).__name__} {backend!r}"
        )
    if backend.strip().lower() not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}; got {backend!r}")
    return backend.strip().lower()


class QKVSplit(nn.Module):
    """Separate ``q_proj`` / ``k_proj`` / ``v_proj`` linears (Hugging Face layout) standing in for a packed
    ``qkv``; :class:`GaussianAttention` calls only the projections it needs. Shares the given modules."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    @property
    def in_features(self) -> int:
        return int(self.k_proj.in_features)

    @property
    def out_features(self) -> int:
        return int(self.q_proj.out_features + self.k_proj.out_features + self.v_proj.out_features)


def _shared_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` whose ``weight`` / ``bias`` ARE the given parameters (built on ``meta``: no init)."""
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = weight
    lin.bias = bias
    return lin


class GaussianAttention(nn.Module):
    """Multi-head self-attention with NACLIP's additive 2-D Gaussian bias, timm's parameter layout.

    ``forward(x, grid_hw)``: ``x`` ``[B, N, dim]`` with ``N = num_prefix_tokens + gh * gw`` (prefix tokens
    first, then the patch grid row-major, ``grid_hw = (gh, gw)`` height first) -> ``[B, N, dim]`` in x's
    dtype. Per head ``h``::

        q, k, v = split_heads(qkv(x))            # [B, H, N, D]; q_norm(q), k_norm(k); q = k if key_key
        O_h = softmax(scale * q k^T + bias_scale * G(sigma_h)) v,   scale = D ** -0.5
        G[i, j] = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 sigma_h^2)) on patch pairs, 0 on prefix rows/cols
        out = proj_drop(proj(norm(merge_heads(O))))   # channel h * D + j, as timm / open_clip / HF

    Args:
        dim: channels ``C``; num_heads: ``H`` (``dim % H == 0`` unless ``head_dim`` is given).
        sigma: Gaussian std in grid cells (``> 0``), or ``None`` for no bias (plain attention).
        bias_scale: multiplier of ``G`` (a finite number).
        learnable_sigma: make sigma an ``nn.Parameter`` literally named ``sigma`` (float32, shape ``[]``,
            or ``[H]`` with ``per_head_sigma``) holding sigma itself; the forward uses
            :meth:`sigma_value` (floored at :data:`SIGMA_FLOOR`, gradient passed straight through).
        key_key: use the keys as queries (NACLIP): ``softmax(scale * k k^T + bias_scale * G) v``.
        qkv_bias / proj_bias: biases of ``qkv`` / ``proj``.
        num_prefix_tokens: ``P`` tokens before the grid (CLS, registers); they get zero bias, not ``-inf``.
        backend: :func:`naclip_kernels.gaussian_attention` backend (``None`` = its default).
        head_dim: ``D`` when it is not ``dim // num_heads`` (then ``qkv`` has ``3 * H * D`` outputs).

    The op has no attention dropout: a module built from one with attention dropout ``> 0``
    (:attr:`attn_drop_p`) refuses to run in training mode (``ValueError``) rather than ignore it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        sigma: float | None = 5.0,
        bias_scale: float = 1.0,
        learnable_sigma: bool = False,
        per_head_sigma: bool = False,
        key_key: bool = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        num_prefix_tokens: int = 1,
        backend: str | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        dim = _check_int("dim", dim)
        self.num_heads = _check_int("num_heads", num_heads)
        if head_dim is None:
            if dim % self.num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({self.num_heads})")
            head_dim = dim // self.num_heads
        self.head_dim = _check_int("head_dim", head_dim)
        self.dim = dim
        self.scale = self.head_dim**-0.5
        self.key_key = _check_bool("key_key", key_key)
        self.num_prefix_tokens = check_prefix(num_prefix_tokens)
        self.bias_scale = _check_finite("bias_scale", bias_scale)
        self.backend = _check_backend(backend)
        self.attn_drop_p = 0.0
        attn_dim = self.num_heads * self.head_dim
        self.qkv: nn.Module = nn.Linear(dim, 3 * attn_dim, bias=_check_bool("qkv_bias", qkv_bias))
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.norm: nn.Module = nn.Identity()
        self.gate: nn.Module | None = None
        self.proj: nn.Module = nn.Linear(attn_dim, dim, bias=_check_bool("proj_bias", proj_bias))
        self.proj_drop: nn.Module = nn.Identity()
        self._init_sigma(sigma, learnable_sigma, per_head_sigma)

    # ---------------------------------------------------------------------------------------------- sigma
    def _init_sigma(self, sigma: Any, learnable: Any, per_head: Any) -> None:
        learnable, per_head = (
            _check_bool("learnable_sigma", learnable),
            _check_bool("per_head_sigma", per_head),
        )
        if per_head and not learnable:
            raise ValueError("per_head_sigma=True needs learnable_sigma=True (a fixed sigma is one number)")
        if sigma is None:
            if learnable:
                raise ValueError("learnable_sigma=True needs a starting sigma > 0; got sigma=None")
            self.fixed_sigma: float | None = None
            return
        value = check_sigma(sigma)
        if not learnable:
            self.fixed_sigma = value
            return
        self.fixed_sigma = None
        self._sigma_init = value
        shape = (self.num_heads,) if per_head else ()
        self.sigma = nn.Parameter(torch.full(shape, value, dtype=torch.float32))

    @classmethod
    def _shell(cls, dim: int, num_heads: int, **kwargs: Any) -> GaussianAttention:
        """An instance built on the ``meta`` device (no weight init) whose projections a ``from_*``
        constructor replaces by shared modules; see :meth:`_place_sigma`."""
        with torch.device("meta"):
            return cls(dim, num_heads, **kwargs)

    def _place_sigma(self, like: Tensor) -> GaussianAttention:
        """Give a shell's learnable sigma its real value, on ``like``'s device (float32)."""
        if self.learnable_sigma:
            shape = tuple(self.sigma.shape)
            self.sigma = nn.Parameter(
                torch.full(shape, self._sigma_init, dtype=torch.float32, device=like.device)
            )
        return self

    @property
    def learnable_sigma(self) -> bool:
        return isinstance(getattr(self, "sigma", None), nn.Parameter)

    def sigma_value(self) -> float | Tensor | None:
        """The sigma the forward uses: the fixed float (or ``None``), or for a learnable sigma
        ``max(sigma, SIGMA_FLOOR)`` with the gradient of the identity (straight-through), so sigma is
        positive by construction and an optimizer step below the floor can still be undone."""
        if not self.learnable_sigma:
            return self.fixed_sigma
        s = self.sigma
        return s + (s.detach().clamp_min(SIGMA_FLOOR) - s.detach())

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs: Any) -> GaussianAttention:
        """A module sharing (not copying) a timm ``Attention``'s ``qkv``, ``q_norm``, ``k_norm``, ``norm``,
        ``gate``, ``proj`` and ``proj_drop``; ``kwargs`` are the keyword options of the constructor
        (``sigma``, ``key_key`` ...). Its ``attn_drop.p`` becomes :attr:`attn_drop_p`."""
        fam.require(attn, fam.TIMM_ATTENTION, "attn")
        out = cls._shell(
            int(attn.qkv.in_features), int(attn.num_heads), head_dim=int(attn.head_dim), **kwargs
        )
        for name in ("qkv", "q_norm", "k_norm", "norm", "proj", "proj_drop"):
            setattr(out, name, getattr(attn, name))
        out.gate = getattr(attn, "gate", None)
        out.dim = int(attn.proj.out_features)
        out.scale = float(attn.scale)
        out.attn_drop_p = float(attn.attn_drop.p)
        return out._place_sigma(attn.qkv.weight)

    @classmethod
    def from_multihead(cls, mha: nn.Module, **kwargs: Any) -> GaussianAttention:
        """A module sharing the packed ``in_proj_weight`` / ``in_proj_bias`` (rows ``[q | k | v]``) and
        ``out_proj`` of an ``nn.MultiheadAttention`` (self-attention, ``kdim == vdim == embed_dim``, no
        ``add_bias_kv`` / ``add_zero_attn``) or of open_clip's ``Attention`` (its ``ln_q`` / ``ln_k`` /
        ``ln_inner`` / ``out_drop`` are shared too; scaled cosine attention and head scaling are refused)."""
        reasons = fam.multihead_unsupported(mha)
        if reasons:
            raise TypeError(f"mha: cannot share this {fam.qualname(mha)}: {'; '.join(reasons)}")
        weight = mha.in_proj_weight
        out = cls._shell(int(weight.shape[1]), int(mha.num_heads), **kwargs)
        out.qkv = _shared_linear(weight, mha.in_proj_bias)
        out.proj = mha.out_proj
        if isinstance(mha, nn.MultiheadAttention):
            out.attn_drop_p = float(mha.dropout)
        else:  # open_clip Attention
            out.q_norm, out.k_norm, out.norm, out.proj_drop = mha.ln_q, mha.ln_k, mha.ln_inner, mha.out_drop
            out.attn_drop_p = float(mha.attn_drop.p)
        return out._place_sigma(weight)

    @classmethod
    def from_hf(cls, attn: nn.Module, **kwargs: Any) -> GaussianAttention:
        """A module sharing a Hugging Face ``ViTAttention`` / ``CLIPAttention``'s ``q_proj`` / ``k_proj`` /
        ``v_proj`` (as a :class:`QKVSplit`) and ``o_proj`` / ``out_proj``."""
        fam.require(attn, fam.HF_ATTENTION, "attn")
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
            raise TypeError(
                f"attn: {fam.qualname(attn)} has no q_proj/k_proj/v_proj (transformers < 5 layout)"
            )
        heads = int(getattr(attn, "num_attention_heads", getattr(attn, "num_heads", 0)))
        out = cls._shell(int(attn.k_proj.in_features), heads, head_dim=int(attn.head_dim), **kwargs)
        out.qkv = QKVSplit(attn.q_proj, attn.k_proj, attn.v_proj)
        out.proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        out.scale = float(getattr(attn, "scaling", getattr(attn, "scale", out.scale)))
        out.attn_drop_p = float(getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0)))
        return out._place_sigma(attn.k_proj.weight)

    # ------------------------------------------------------------------------------ head split / merge
    def project_heads(self, x: Tensor, *, with_query: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
        """``x`` ``[B, N, C]`` -> ``(q, k, v)``, each ``[B, H, N, D]`` (strided views of the projection, no
        copies), ``q_norm`` / ``k_norm`` applied. ``with_query=False`` skips the Q projection (``q=None``)."""
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv
        if isinstance(qkv, QKVSplit):
            q = qkv.q_proj(x).view(b, n, h, d).transpose(1, 2) if with_query else None
            k = qkv.k_proj(x).view(b, n, h, d).transpose(1, 2)
            v = qkv.v_proj(x).view(b, n, h, d).transpose(1, 2)
        elif with_query:
            q, k, v = qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        else:  # the K and V rows of the packed projection only
            rows = h * d
            bias = None if qkv.bias is None else qkv.bias[rows:]
            k, v = F.linear(x, qkv.weight[rows:], bias).view(b, n, 2, h, d).permute(2, 0, 3, 1, 4)
            q = None
        return (None if q is None else self.q_norm(q)), self.k_norm(k), v

    def merge_heads(self, out: Tensor, x: Tensor | None = None) -> Tensor:
        """``out`` ``[B, H, N, D]`` -> ``proj_drop(proj(norm(...)))`` ``[B, N, dim]`` (channel ``h * D + j``);
        ``x`` (the block's attention input) is needed only for a timm ``gate``."""
        b, _, n, _ = out.shape
        y = self.norm(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        if self.gate is not None:
            y = y * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(y))

    # ------------------------------------------------------------------------------------------ forward
    def _check_call(self, x: Any, grid_hw: Any) -> tuple[int, int] | None:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a [B, N, C] tensor; got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[-1] != self.qkv_in_features:
            raise ValueError(f"x must have C = {self.qkv_in_features} channels; got shape {tuple(x.shape)}")
        if self.training and self.attn_drop_p > 0:
            raise ValueError(
                f"attention dropout p={self.attn_drop_p} in training mode is not supported by the fused op "
                "(it has no dropout); set the attention dropout to 0 or call .eval()"
            )
        if grid_hw is None:
            if self.fixed_sigma is not None or self.learnable_sigma:
                raise ValueError("grid_hw must be given as (gh, gw) when the module has a Gaussian bias")
            return None
        gh, gw = check_grid(grid_hw)
        n, p = int(x.shape[1]), self.num_prefix_tokens
        if p + gh * gw != n:
            raise ValueError(
                f"x has N = {n} tokens but num_prefix_tokens + gh * gw = {p} + {gh} * {gw} = {p + gh * gw} "
                f"for grid_hw={(gh, gw)} (token dropping / merging is not supported)"
            )
        return gh, gw

    @property
    def qkv_in_features(self) -> int:
        return int(self.qkv.in_features)

    def forward(self, x: Tensor, grid_hw: tuple[int, int] | None) -> Tensor:
        grid = self._check_call(x, grid_hw)
        q, k, v = self.project_heads(x, with_query=not self.key_key)
        out = gaussian_attention(
            k if q is None else q,
            k,
            v,
            grid,
            self.sigma_value(),
            scale=self.scale,
            num_prefix_tokens=self.num_prefix_tokens,
            bias_scale=self.bias_scale,
            backend=self.backend,
        )
        return self.merge_heads(out, x)

    def extra_repr(self) -> str:
        sigma = (
            f"sigma=learnable{list(self.sigma.shape)}"
            if self.learnable_sigma
            else f"sigma={self.fixed_sigma}"
        )
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, {sigma}, bias_scale={self.bias_scale}, "
            f"key_key={self.key_key}, num_prefix_tokens={self.num_prefix_tokens}, backend={self.backend}"
        )


# ------------------------------------------------------------------------------------------------ adapters
class _GridState:
    """The patch grid of the forward in flight, written by a pre-hook on the model's patch embedding."""

    def __init__(self, grid_of: Any) -> None:
        self.grid_of = grid_of
        self.hw: tuple[int, int] | None = None

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.hw = self.grid_of(module, args[0])

    def get(self) -> tuple[int, int]:
        if self.hw is None:
            raise RuntimeError(
                "patched attention ran before the model's patch embedding: call the patched model on images"
            )
        return self.hw


class _Patched(GaussianAttention):
    """A :class:`GaussianAttention` called with a host model's attention signature (see subclasses)."""

    _grid: _GridState
    _batch_first: bool = True

    def _run(self, x: Tensor) -> Tensor:
        return GaussianAttention.forward(self, x, self._grid.get())


def _refuse(what: str, value: Any) -> None:
    if value is not None and value is not False:
        raise ValueError(f"patched Gaussian attention does not support {what}; got {what}={value!r}")


class _TimmPatched(_Patched):
    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        _refuse("attn_mask", attn_mask)
        _refuse("is_causal", is_causal)
        return self._run(x)


class _OpenClipMHAPatched(_Patched):
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if key is not query or value is not query:
            raise ValueError(
                "patched Gaussian attention is self-attention only (key and value must be query)"
            )
        _refuse("key_padding_mask", key_padding_mask)
        _refuse("attn_mask", attn_mask)
        _refuse("is_causal", is_causal)
        if self._batch_first:
            return self._run(query), None
        return self._run(query.transpose(0, 1)).transpose(0, 1), None


class _OpenClipAttentionPatched(_Patched):
    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        _refuse("attn_mask", attn_mask)
        return self._run(x)


class _HFPatched(_Patched):
    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any):
        _refuse("attention_mask", attention_mask)
        _refuse("output_attentions", kwargs.get("output_attentions"))
        return self._run(hidden_states), None


_ADAPTERS = {
    "timm": (_TimmPatched, GaussianAttention.from_timm),
    "open_clip_mha": (_OpenClipMHAPatched, GaussianAttention.from_multihead),
    "open_clip_attention": (_OpenClipAttentionPatched, GaussianAttention.from_multihead),
    "hf": (_HFPatched, GaussianAttention.from_hf),
}


def _adapter(kind: str, original: nn.Module, grid: _GridState, kwargs: dict) -> GaussianAttention:
    cls, build = _ADAPTERS[kind]
    module = build.__func__(cls, original, **kwargs)
    module._grid = grid
    module._batch_first = bool(getattr(original, "batch_first", True))
    module.train(original.training)
    return module


# ------------------------------------------------------------------------------------------ patch_vit
class PatchHandle:
    """What :func:`patch_vit` returns: ``modules`` (the new :class:`GaussianAttention` per patched block,
    keyed by block index), ``family``, ``remove()`` (idempotent; puts the original modules back exactly and
    removes the grid hook) and context-manager use (``with patch_vit(...) as h:`` removes on exit)."""

    def __init__(self, family: str, swaps: list, hook: Any) -> None:
        self.family = family
        self._swaps = swaps  # (block index, parent, attribute, original, new)
        self._hook = hook
        self.modules: dict[int, GaussianAttention] = {i: new for i, _, _, _, new in swaps}
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        for _, parent, attr, original, _ in reversed(self._swaps):
            setattr(parent, attr, original)
        self._hook.remove()
        self.removed = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"PatchHandle(family={self.family!r}, blocks={sorted(self.modules)}, {state})"


def _select_blocks(blocks: Any, count: int) -> list[int]:
    """``"all"`` / ``"last"`` / ints (negatives from the end) -> sorted distinct indices in ``[0, count)``."""
    if isinstance(blocks, str):
        if blocks not in ("all", "last"):
            raise ValueError(f"blocks must be 'all', 'last' or a list of block indices; got {blocks!r}")
        return list(range(count)) if blocks == "all" else [count - 1]
    if not isinstance(blocks, Iterable):
        raise TypeError(
            f"blocks must be 'all', 'last' or a list of ints; got {type(blocks).__name__} {blocks!r}"
        )
    out: list[int] = []
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"blocks must hold ints; got {type(i).__name__} {i!r} in {blocks!r}")
        if not -count <= int(i) < count:
            raise ValueError(f"block index {i} out of range for a model with {count} blocks")
        out.append(int(i) % count)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"blocks must list distinct block indices (at least one); got {blocks!r}")
    return sorted(out)


def patch_vit(
    model: nn.Module,
    *,
    sigma: float,
    blocks: str | Iterable[int] = "all",
    key_key: bool = False,
    learnable_sigma: bool = False,
    per_head_sigma: bool = False,
    bias_scale: float = 1.0,
    backend: str | None = None,
) -> PatchHandle:
    """Replace the self-attention of the chosen blocks of ``model`` by :class:`GaussianAttention` modules
    that share its weights and add ``bias_scale * G(sigma)`` to the scaled logits; nothing else changes
    (residuals, norms, MLP, layer scale, drop-path stay the model's own).

    Supported (``TypeError`` naming the class otherwise): timm ``VisionTransformer`` with timm ``Attention``
    blocks (fixed or ``dynamic_img_size`` inputs; class token, register tokens or none: ``P =
    model.num_prefix_tokens``), open_clip ``VisionTransformer`` (or a ``CLIP`` holding one as ``visual``;
    ``P = 1``), and with ``transformers`` installed HF ``ViTModel`` / ``ViTFor*`` (``.vit``) and
    ``CLIPVisionModel`` / ``CLIPModel`` (``P = 1``). The grid ``(gh, gw)`` is read from each forward's
    image by a pre-hook on the patch embedding, so any input size the model accepts works, non-square too.
    ``blocks``: ``"all"``, ``"last"`` or block indices (negatives from the end). Other arguments as in
    :class:`GaussianAttention`. Returns a :class:`PatchHandle`.
    """
    kwargs = {
        "sigma": check_sigma(sigma),
        "key_key": key_key,
        "learnable_sigma": learnable_sigma,
        "per_head_sigma": per_head_sigma,
        "bias_scale": bias_scale,
        "backend": backend,
    }
    info = fam.resolve(model)
    chosen = _select_blocks(blocks, len(info.attentions))
    grid = _GridState(info.grid_of)
    swaps = []
    for i in chosen:
        parent, attr = info.attentions[i]
        original = getattr(parent, attr)
        kind = fam.attention_kind(original, where=f"block {i}")
        new = _adapter(kind, original, grid, dict(kwargs, num_prefix_tokens=info.num_prefix_tokens))
        swaps.append((i, parent, attr, original, new))
    for _, parent, attr, _, new in swaps:  # swap only after every block was checked and built
        setattr(parent, attr, new)
    return PatchHandle(info.family, swaps, info.embed.register_forward_pre_hook(grid.hook))
