"""SC-CLIP (self-calibrated CLIP): LOF outlier repair, similarity-guided last block and multi-level fusion.

:class:`ScclipVisual` returns ``[B, gh*gw, output_dim]`` (**no CLS row**, ``num_prefix_tokens = 0``). With
``f_i`` the outputs of blocks ``0 .. L-2`` (``F = f_{L-2}``, the penultimate, CLS at 0), ``n(.)`` row
L2-normalisation and ``agg(C, x) = (C / (rowsum(C) + 1e-6)) x``:

1. ``O`` = LOF outliers of ``F``'s patch tokens (:func:`lof_outliers`); ``x`` = :func:`repair_outliers` of
   ``F``'s patch tokens (CLS set aside: ``cls = F[0]``).
2. ``mid = n(repair(f_pre)) n(repair(f_pre))^T``; ``x = agg(mid >= beta, x)``;
   ``x = attn(ln_1(x), mid) + res_cls * cls`` with ``attn = out_proj(((softmax(3 (mid - mean(mid)), <0 ->
   -inf) + softmax(s K K^T)) / 2) V)`` (no residual, no MLP, no Gaussian; ``softmax(s K K^T) V`` by the fused
   op).
3. ``after = n(f_post) n(f_post)^T`` thresholded at ``beta``; ``x = agg(after, x)``.
4. ``R = sum_{i in [multi_start, multi_end)} f_i``;
   ``x += agg(after, attn(ln_1(R[1:]), mid) + res_cls R[0])``.
5. ``ln_post(x) @ proj``.

Per image (the official code is batch-1 only) and with the correct ``(idx // gw, idx % gw)`` outlier positions
(the official ``idx // gh`` crashes on non-square grids). Quirks and deviations: ``docs/methods.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import naclip_kernels
from naclip._validate import check_int
from naclip.methods._blocks import finish_block, last_block_attention, run_blocks
from naclip.methods._params import SCCLIP_PARAMS, check_fraction, check_index, map_layer_index
from naclip.model import NaclipVisual

__all__ = ["ScclipVisual", "default_scclip_layers", "lof_outliers", "repair_outliers"]

#: Elements of the ``[rows, N, C]`` difference buffer of one LOF distance chunk.
_LOF_CHUNK_ELEMS = 1 << 25


def default_scclip_layers(depth: int) -> dict[str, int]:
    """Official ViT-B/16 ``pre=8, post=3, multi=[3, 10)`` (indices of the ``depth - 1`` intermediate outputs)
    mapped to ``depth`` blocks (:mod:`naclip.methods._params`)."""
    last = depth - 2
    start = map_layer_index(3, depth, upper=last)
    return {
        "pre_adjust_idx": map_layer_index(8, depth, upper=last),
        "post_adjust_idx": map_layer_index(3, depth, upper=last),
        "multi_start_idx": start,
        "multi_end_idx": max(start + 1, map_layer_index(10, depth, upper=last + 1)),
    }


def lof_outliers(x: Tensor, n_neighbors: int = 30, contamination: float = 0.05) -> tuple[Tensor, Tensor]:
    """``(outlier mask [B, N] bool, LOF scores [B, N])`` of the official ``lof_pytorch``, per image.

    ``D = ||x_i - x_j||^2`` (computed as the official difference norm, in row chunks); the ``k`` nearest
    neighbours (``topk(k + 1)`` smallest, the first dropped as self); ``reach_ij = max(D_ij, kdist_i)`` (the
    query's own k-distance, not sklearn's); ``LRD_i = k / mean_j reach_ij`` (NaN -> 1e-6); ``LOF_i = mean_j
    LRD_{nn_j} / LRD_i``; outliers: ``LOF > quantile(LOF, 1 - contamination)``.
    ``k = min(n_neighbors, N - 1)``
    (the official code needs ``N > n_neighbors``).
    """
    b, n, c = x.shape
    k = min(n_neighbors, n - 1)
    if k < 1:
        return torch.zeros((b, n), dtype=torch.bool, device=x.device), x.new_ones((b, n))
    rows = max(1, _LOF_CHUNK_ELEMS // (n * c))
    masks, scores = [], []
    for xb in x:
        dist = torch.cat(
            [torch.norm(xb[r0 : r0 + rows, None] - xb[None, :], dim=2, p=2) ** 2 for r0 in range(0, n, rows)]
        )
        knn_d, knn_i = torch.topk(dist, k=k + 1, largest=False)
        knn_d, knn_i = knn_d[:, 1:], knn_i[:, 1:]
        reach = torch.max(knn_d, knn_d[:, -1:].expand_as(knn_d))
        lrd = k / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
        lof = (lrd[knn_i] / lrd.unsqueeze(1)).mean(dim=1)
        masks.append(lof > torch.quantile(lof.float(), 1 - contamination))
        scores.append(lof)
    return torch.stack(masks), torch.stack(scores)


def repair_outliers(x: Tensor, outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """Replace each outlier patch token by the mean of its non-outlier 3x3 neighbours (zero padding); an
    outlier without such a neighbour is kept. ``x`` ``[B, N, C]`` row-major on ``grid``, ``outliers`` ``[B,
    N]`` bool -> ``[B, N, C]``."""
    b, n, c = x.shape
    gh, gw = grid
    fmap = x.transpose(1, 2).reshape(b, c, gh, gw)
    keep = (~outliers).to(x.dtype).view(b, 1, gh, gw)
    ring = torch.ones((1, 1, 3, 3), dtype=x.dtype, device=x.device)
    ring[0, 0, 1, 1] = 0
    total = F.conv2d((fmap * keep).reshape(b * c, 1, gh, gw), ring, padding=1).view(b, c, gh, gw)
    count = F.conv2d(keep, ring, padding=1)  # [B, 1, gh, gw]
    mean = total / count.clamp(min=1)
    update = outliers.view(b, 1, gh, gw) & (count > 0)
    return torch.where(update, mean, fmap).reshape(b, c, n).transpose(1, 2)


def _cosine(x: Tensor) -> Tensor:
    x = x / x.norm(dim=-1, keepdim=True)
    return x @ x.transpose(1, 2)


def _aggregate(x: Tensor, corr: Tensor) -> Tensor:
    return (corr / (corr.sum(dim=-1, keepdim=True) + 1e-6)) @ x


class ScclipVisual(NaclipVisual):
    """SC-CLIP dense features ``[B, gh*gw, output_dim]`` (patch tokens only; not L2-normalised).

    Args (keyword-only after ``visual``; defaults = the official ViT-B/16 config):
        pre_adjust_idx, post_adjust_idx, multi_start_idx, multi_end_idx: indices into the outputs of blocks
            ``0 .. L-2`` (``multi`` is ``[start, end)``); ``None`` = :func:`default_scclip_layers`.
        res_cls: weight of the CLS token added back (0.3); beta: similarity threshold (0.4).
        lof_neighbors, lof_contamination: LOF ``k`` (30) and outlier fraction (0.05).
        backend: ``naclip_kernels`` backend of the ``K K^T`` attention.
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        visual,
        *,
        pre_adjust_idx: int | None = None,
        post_adjust_idx: int | None = None,
        multi_start_idx: int | None = None,
        multi_end_idx: int | None = None,
        res_cls: float = 0.3,
        beta: float = 0.4,
        lof_neighbors: int = 30,
        lof_contamination: float = 0.05,
        backend: str | None = None,
    ) -> None:
        super().__init__(visual, arch="reduced", strategy="kk", backend=backend)
        if len(self.visual.transformer.resblocks) < 2:
            raise ValueError("SC-CLIP needs a ViT with at least 2 blocks (one intermediate output)")
        self._layers = {}
        self.configure(
            pre_adjust_idx=pre_adjust_idx,
            post_adjust_idx=post_adjust_idx,
            multi_start_idx=multi_start_idx,
            multi_end_idx=multi_end_idx,
            res_cls=res_cls,
            beta=beta,
            lof_neighbors=lof_neighbors,
            lof_contamination=lof_contamination,
        )

    def configure(self, **params) -> None:
        """Change method parameters (names of ``__init__``); all validated before any is applied."""
        unknown = sorted(set(params) - set(SCCLIP_PARAMS))
        if unknown:
            raise ValueError(
                f"SC-CLIP parameters: unknown {unknown}; expected some of {sorted(SCCLIP_PARAMS)}"
            )
        new = {k: getattr(self, k, None) for k in SCCLIP_PARAMS}
        new.update(params)
        count = len(self.visual.transformer.resblocks) - 1  # intermediate outputs
        auto = default_scclip_layers(count + 1)
        layers = {}
        for name in ("pre_adjust_idx", "post_adjust_idx", "multi_start_idx"):
            layers[name] = auto[name] if new[name] is None else check_index(name, new[name], count)
        end = auto["multi_end_idx"] if new["multi_end_idx"] is None else new["multi_end_idx"]
        layers["multi_end_idx"] = check_index("multi_end_idx", end, count + 1)
        if layers["multi_end_idx"] <= layers["multi_start_idx"]:
            raise ValueError(
                f"multi_end_idx: expected > multi_start_idx ({layers['multi_start_idx']}), got {end!r}"
            )
        new["res_cls"] = float(check_fraction("res_cls", new["res_cls"]))
        new["beta"] = check_fraction("beta", new["beta"])
        new["lof_contamination"] = check_fraction("lof_contamination", new["lof_contamination"])
        new["lof_neighbors"] = check_int("lof_neighbors", new["lof_neighbors"], minimum=1)
        for name, value in new.items():
            setattr(self, name, value)
        self._layers = layers

    @property
    def needs_text(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, layers={self._layers}, res_cls={self.res_cls}, beta={self.beta}"

    def _attn(self, x: Tensor, mid: Tensor) -> Tensor:
        """The last block's ``out_proj(((softmax(M) + softmax(s K K^T)) / 2) V)`` on patch tokens ``x``."""
        m = (mid - mid.mean(dim=(1, 2), keepdim=True)) * 3.0
        probs = torch.softmax(m.masked_fill(m < 0.0, float("-inf")), dim=-1).unsqueeze(1)  # [B, 1, N, N]

        def attend(q, k, v):
            kk = naclip_kernels.gaussian_attention(
                k, k, v, None, None, num_prefix_tokens=0, backend=self.backend
            )
            return (torch.matmul(probs, v.float()).to(v.dtype) + kk) / 2

        block = self.visual.transformer.resblocks[-1]
        return finish_block(block, x, last_block_attention(block, x, attend, needs_query=False), "reduced")

    def forward_last_block(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Not available alone (the method's last block needs more than its input); use
        :meth:`forward_intermediates` and its ``pre_ln_post``."""
        raise TypeError(
            f"{type(self).__name__}.forward_last_block: this method's last block needs more than its input; "
            "use forward_intermediates (its 'pre_ln_post')"
        )

    def forward_intermediates(self, images: Tensor) -> dict[str, Tensor]:
        """Every stage: ``dense``, ``pre_ln_post``, ``outliers`` ``[B, N]``, ``lof``, ``mid_simi``,
        ``last_attn_out``, ``multi_attn_out`` (without the ``res_cls`` term) and ``block_outputs``."""
        x, grid = self._embed(images)
        _, feats, _ = run_blocks(self, x, keep_outputs=True)
        lay = self._layers
        last = feats[-1]
        outliers, lof = lof_outliers(last[:, 1:], self.lof_neighbors, self.lof_contamination)
        x = repair_outliers(last[:, 1:], outliers, grid)
        mid = _cosine(repair_outliers(feats[lay["pre_adjust_idx"]][:, 1:], outliers, grid))
        x = _aggregate(x, mid.masked_fill(mid < self.beta, 0.0))
        last_attn = self._attn(x, mid)
        x = last_attn + self.res_cls * last[:, :1]
        after = _cosine(feats[lay["post_adjust_idx"]][:, 1:])
        after = after.masked_fill(after < self.beta, 0.0)
        x = _aggregate(x, after)
        multi = torch.stack(feats[lay["multi_start_idx"] : lay["multi_end_idx"]]).sum(dim=0)
        multi_attn = self._attn(multi[:, 1:], mid)
        x = x + _aggregate(multi_attn + self.res_cls * multi[:, :1], after)
        return {
            "dense": self.project(x),
            "pre_ln_post": x,
            "outliers": outliers,
            "lof": lof,
            "mid_simi": mid,
            "last_attn_out": last_attn,
            "multi_attn_out": multi_attn,
            "block_outputs": feats,
        }

    def forward(self, images: Tensor) -> Tensor:
        """Dense features ``[B, gh*gw, output_dim]`` (patch tokens only, no CLS)."""
        return self.forward_intermediates(images)["dense"]
