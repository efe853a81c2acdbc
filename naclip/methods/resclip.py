"""ResCLIP (CVPR 2025): RCS (residual cross-correlation self-attention) + SFR (semantic feedback refinement).

:class:`ResclipVisual` is NACLIP's visual forward (reduced last block, ``K K^T`` + Gaussian) with two extra
terms, each switchable (``rcs``, ``sfr``)::

    Z    = s K K^T + G                                     (SFR off: the fused NACLIP op)
    Z    = tau_sfr ((1 - lam_sfr) s K K^T + [lam_sfr S16]) + G     (SFR on: dense, see below)
    out  = tau_rcs (1 - lam_rcs) softmax(Z) V + tau_rcs lam_rcs mean_{l in rcs_layers} softmax(s q_l k_l^T) V
                                                           (RCS off: out = softmax(Z) V)

Every RCS term is an ordinary attention ``attention(q_l, k_l, v_last)`` computed by the fused op (no N x N
map; only ``q_l, k_l`` of the chosen blocks are kept). ``S`` is the SFR bias from a first pass (last block
with RCS, no SFR -> cosine logits with the query features -> bilinear to the input size -> PAMR(10, (8, 16))
-> ``softmax(logit_scale * .)`` -> per-patch label mode (``temp_thd``) -> :func:`sfr_bias`), divided by its
global max and rounded to float16 like the official code (``[lam_sfr S16]`` is that fp16 product). ``S`` is
data-dependent, so the SFR softmax is dense, in query-row chunks (:func:`chunked_dense_attention`).
Exact formulas, quirks and deviations: ``docs/methods.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import naclip_kernels
from naclip._validate import check_bool, check_int
from naclip.methods._blocks import (
    check_qk_layers,
    chunked_dense_attention,
    finish_block,
    last_block_attention,
    run_blocks,
)
from naclip.methods._params import (
    RESCLIP_PARAMS,
    check_fraction,
    check_layers,
    check_pair,
    check_positive,
    map_layer_range,
)
from naclip.model import NaclipVisual
from naclip.pamr import pamr as _pamr

__all__ = ["ResclipVisual", "default_rcs_layers", "patch_labels", "sfr_bias"]

#: Elements of the path-check buffer ``[rows, N, steps + 1]`` per chunk of start patches.
_PATH_CHUNK_ELEMS = 1 << 24


def default_rcs_layers(depth: int) -> tuple[int, ...]:
    """RCS blocks for a ViT of ``depth`` blocks: the official ViT-B/16 choice ``range(5, 9)`` of 12 blocks,
    scaled to the same fraction of the depth (:func:`naclip.methods._params.map_layer_range`)."""
    return map_layer_range(5, 9, depth)


def patch_labels(temp_probs: Tensor, patch_hw: tuple[int, int], temp_thd: float) -> Tensor:
    """Per-patch label of the SFR first pass: ``[B, Q, H, W]`` probabilities -> ``[B, gh, gw]`` int64.

    Pixel label = argmax over queries, ``0`` where the max probability is ``< temp_thd``; the patch label is
    the most frequent pixel label of its ``ph x pw`` pixels (ties: the smallest label, as ``torch.mode``);
    ``gh = H // ph``, ``gw = W // pw`` (remainder pixels ignored, like ``unfold``).
    """
    b, q, h, w = temp_probs.shape
    ph, pw = patch_hw
    top, pred = temp_probs.max(dim=1)  # [B, H, W]
    pred = pred.masked_fill(top < temp_thd, 0)
    gh, gw = h // ph, w // pw
    cells = pred[:, : gh * ph, : gw * pw].reshape(b, gh, ph, gw, pw).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(b * gh * gw, ph * pw)
    counts = torch.zeros((cells.shape[0], q), dtype=torch.int32, device=cells.device)
    counts.scatter_add_(1, cells, torch.ones_like(cells, dtype=torch.int32))
    return counts.argmax(dim=1).view(b, gh, gw)  # argmax returns the first (smallest) of tied labels


def _path_valid(labels: Tensor, gh: int, gw: int) -> tuple[Tensor, Tensor, int]:
    """``(valid [N, N] bool, steps [N, N] int64, max_steps)`` of the official ``check_path`` for one image.

    ``steps[i, j]`` = Chebyshev distance of patches ``i, j``; ``valid[i, j]``: the points
    ``round(p_i (1 - t_s) + p_j t_s)``, ``t_s = linspace(0, 1, max_steps + 1)[s]``, ``s = 0 .. steps[i, j]``,
    all carry the label of ``i`` (float32 arithmetic and half-to-even rounding as in the official code).
    Computed for chunks of start patches (at most ``_PATH_CHUNK_ELEMS`` path points at once).
    """
    n = gh * gw
    dev = labels.device
    idx = torch.arange(n, device=dev)
    coords = torch.stack((idx // gw, idx % gw), dim=-1)  # [N, 2] (row, col)
    steps = (coords[:, None, :] - coords[None, :, :]).abs().amax(dim=-1)  # [N, N]
    max_steps = int(steps.max())
    t = torch.linspace(0, 1, steps=max_steps + 1, device=dev).view(1, 1, -1, 1)
    flat = labels.reshape(-1)
    rows = max(1, _PATH_CHUNK_ELEMS // (n * (max_steps + 1)))
    valid = torch.empty((n, n), dtype=torch.bool, device=dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        start = coords[r0:r1, None, None, :]  # [r, 1, 1, 2]
        pts = (start * (1 - t) + coords[None, :, None, :] * t).round().long()  # [r, N, S, 2]
        along = flat[pts[..., 0] * gw + pts[..., 1]]  # [r, N, S]
        counted = torch.arange(max_steps + 1, device=dev).view(1, 1, -1) <= steps[r0:r1, :, None]
        valid[r0:r1] = ((along == flat[r0:r1, None, None]) | ~counted).all(dim=-1)
    return valid, steps, max_steps


def sfr_bias(labels: Tensor, gaussian_std: float, *, delete_same_entity: bool = True) -> Tensor:
    """SFR bias between patches of one label map ``[gh, gw]`` -> float32 ``[N, N]`` (no CLS row/column).

    ``M[i, j] = [label_i == label_j]``; with ``delete_same_entity`` entries whose straight path leaves the
    label (:func:`_path_valid`) are multiplied by ``exp(-steps / max_steps)``; each row is blurred by a 1-D
    Gaussian over the **flat** patch index (size ``min(N, int(6 std + 1))`` made odd, zero padding), ReLU,
    then divided by ``rowsum + 1e-8``.
    """
    gh, gw = labels.shape
    n = gh * gw
    flat = labels.reshape(-1)
    m = (flat[:, None] == flat[None, :]).float()
    if delete_same_entity and n > 1:
        valid, steps, max_steps = _path_valid(labels, gh, gw)
        m = torch.where(valid, m, m * torch.exp(-steps / max_steps))
    size = min(n, int(6 * gaussian_std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * gaussian_std**2))
    kernel = kernel / kernel.sum()
    m = F.relu(F.conv1d(m.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1))
    return m / (m.sum(dim=1, keepdim=True) + 1e-8)


class ResclipVisual(NaclipVisual):
    """ResCLIP dense features ``[B, 1 + gh*gw, output_dim]`` (token 0 = CLS; not L2-normalised).

    Args (keyword-only after ``visual``; defaults = the official ViT-B/16 / ADE20K config):
        rcs, sfr: switch the two terms (the official segmentor always has both on).
        rcs_layers: intermediate blocks (0-based, ``< L-1``) whose attention RCS averages; ``None`` =
            :func:`default_rcs_layers` (``(5, 6, 7, 8)`` for 12 blocks).
        rcs_weights, sfr_weights: ``(tau, lam)`` of each term.
        temp_thd: first-pass probability below which a pixel gets label 0 (in ``[0, 1]``).
        delete_same_entity: path check of the SFR bias.
        logit_scale: softmax temperature of the first pass (the segmentor's, 40).
        sfr_pamr_steps, sfr_pamr_dilations: PAMR of the first pass (10, (8, 16); 0 steps = off).
        arch, gaussian_std, backend: as :class:`naclip.model.NaclipVisual` (``reduced`` = official wo_resi).

    ``forward(images, text)``: ``text`` ``[Q, D]`` query features (unit rows) are required when ``sfr`` is
    on (:attr:`needs_text`); every image of a batch gets its own first pass (the official code is batch-1
    only). :meth:`forward_intermediates` also returns the first-pass maps.
    """

    def __init__(
        self,
        visual,
        *,
        rcs: bool = True,
        sfr: bool = True,
        rcs_layers: Sequence[int] | None = None,
        rcs_weights: Sequence[float] = (2.0, 0.3),
        sfr_weights: Sequence[float] = (2.1, 0.7),
        temp_thd: float = 0.25,
        delete_same_entity: bool = True,
        logit_scale: float = 40.0,
        sfr_pamr_steps: int = 10,
        sfr_pamr_dilations: Sequence[int] = (8, 16),
        arch: str = "reduced",
        gaussian_std: float = 5.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(visual, arch=arch, strategy="naclip", gaussian_std=gaussian_std, backend=backend)
        self.configure(
            rcs=rcs,
            sfr=sfr,
            rcs_layers=rcs_layers,
            rcs_weights=rcs_weights,
            sfr_weights=sfr_weights,
            temp_thd=temp_thd,
            delete_same_entity=delete_same_entity,
            logit_scale=logit_scale,
            sfr_pamr_steps=sfr_pamr_steps,
            sfr_pamr_dilations=sfr_pamr_dilations,
        )

    def configure(self, **params) -> None:
        """Change method parameters (names of ``__init__``; ``arch`` / ``gaussian_std`` via ``set_params``);
        all are validated before any is applied."""
        new = {k: getattr(self, k) for k in RESCLIP_PARAMS if hasattr(self, k)}
        unknown = sorted(set(params) - set(RESCLIP_PARAMS) - {"arch", "gaussian_std"})
        if unknown:
            raise ValueError(
                f"ResCLIP parameters: unknown {unknown}; expected some of {sorted(RESCLIP_PARAMS)}"
            )
        new.update({k: v for k, v in params.items() if k in RESCLIP_PARAMS})
        depth = len(self.visual.transformer.resblocks)
        for flag in ("rcs", "sfr", "delete_same_entity"):
            check_bool(flag, new[flag])
        layers = default_rcs_layers(depth) if new["rcs_layers"] is None else new["rcs_layers"]
        layers = check_layers("rcs_layers", layers, depth - 1)
        if new["rcs"]:
            check_qk_layers(self, layers, "rcs_layers")
        new["rcs_layers"] = None if new["rcs_layers"] is None else layers
        new["rcs_weights"] = check_pair("rcs_weights", new["rcs_weights"])
        new["sfr_weights"] = check_pair("sfr_weights", new["sfr_weights"])
        new["temp_thd"] = check_fraction("temp_thd", new["temp_thd"])
        new["logit_scale"] = check_positive("logit_scale", new["logit_scale"])
        new["sfr_pamr_steps"] = check_int("sfr_pamr_steps", new["sfr_pamr_steps"], minimum=0)
        new["sfr_pamr_dilations"] = tuple(new["sfr_pamr_dilations"])
        self.set_params(arch=params.get("arch"), gaussian_std=params.get("gaussian_std"))
        for k, v in new.items():
            setattr(self, k, v)
        self._layers = layers

    @property
    def needs_text(self) -> bool:
        """True when :meth:`forward` needs the query features (SFR on)."""
        return self.sfr

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rcs={self.rcs} (layers {self._layers}, {self.rcs_weights}), "
            f"sfr={self.sfr} ({self.sfr_weights}, temp_thd={self.temp_thd})"
        )

    # ------------------------------------------------------------------ pieces
    def _rcs_attention(self, qk: dict, v: Tensor, grid: tuple[int, int]) -> Tensor:
        """``mean_l softmax(s q_l k_l^T) v`` over the RCS layers, by the fused op (layers stacked on the
        batch axis)."""
        n = len(self._layers)
        q = torch.cat([qk[i][0] for i in self._layers], dim=0)
        k = torch.cat([qk[i][1] for i in self._layers], dim=0)
        vv = v.unsqueeze(0).expand(n, *v.shape).reshape(n * v.shape[0], *v.shape[1:])
        out = naclip_kernels.gaussian_attention(
            q, k, vv, grid, None, num_prefix_tokens=1, backend=self.backend
        )
        return out.view(n, *v.shape).mean(dim=0)

    def _sfr_attention(self, k: Tensor, v: Tensor, grid: tuple[int, int], s16: Tensor) -> Tensor:
        """``softmax(tau ((1-lam) s K K^T + [lam S16]) + G) V``, dense in row chunks. ``s16``: ``[B, T, T]``
        float16 ``S / max S``."""
        tau, lam = self.sfr_weights
        scale = k.shape[-1] ** -0.5
        g = naclip_kernels.gaussian_bias(grid, self.gaussian_std, num_prefix_tokens=1, device=k.device)
        sfr_term = (lam * s16).float().unsqueeze(1)  # the official fp16 product, [B, 1, T, T]
        kf = k.float()

        def logits(r0: int, r1: int) -> Tensor:
            z = torch.matmul(kf[:, :, r0:r1], kf.transpose(-1, -2)) * scale
            return tau * ((1 - lam) * z + sfr_term[:, :, r0:r1]) + g[r0:r1]

        return chunked_dense_attention(logits, v, k.shape[1])

    def _last_block(self, x: Tensor, grid, qk: dict, s16: Tensor | None) -> Tensor:
        def attend(q, k, v):
            if s16 is None:
                out = naclip_kernels.gaussian_attention(
                    k, k, v, grid, self.gaussian_std, num_prefix_tokens=1, backend=self.backend
                )
            else:
                out = self._sfr_attention(k, v, grid, s16)
            if not self.rcs:
                return out
            tau, lam = self.rcs_weights
            return tau * (1 - lam) * out + (tau * lam) * self._rcs_attention(qk, v, grid)

        block = self.visual.transformer.resblocks[-1]
        return finish_block(block, x, last_block_attention(block, x, attend, needs_query=False), self.arch)

    def _first_pass(self, x, grid, qk, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """``(temp_probs [B, Q, H, W], labels [B, gh, gw])`` of the SFR first pass."""
        feats = self.project(self._last_block(x, grid, qk, None))[:, 1:].float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = feats @ text.to(device=feats.device, dtype=feats.dtype).T  # [B, N, Q]
        logits = logits.permute(0, 2, 1).reshape(x.shape[0], -1, *grid)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.sfr_pamr_steps > 0:
            try:
                logits = _pamr(images.float(), logits, self.sfr_pamr_steps, self.sfr_pamr_dilations)
            except RuntimeError as exc:  # as the official try/except: keep the unrefined logits
                warnings.warn(f"ResCLIP first-pass PAMR skipped: {exc}", RuntimeWarning, stacklevel=3)
        probs = torch.softmax(logits * self.logit_scale, dim=1)
        return probs, patch_labels(probs, self.patch_size, self.temp_thd)

    def _sfr_matrix(self, labels: Tensor) -> Tensor:
        """``[B, T, T]`` SFR bias with zero CLS row/column (the official ``attention_sfr``)."""
        b, gh, gw = labels.shape
        out = labels.new_zeros((b, 1 + gh * gw, 1 + gh * gw), dtype=torch.float32)
        for i in range(b):
            out[i, 1:, 1:] = sfr_bias(
                labels[i], self.gaussian_std, delete_same_entity=self.delete_same_entity
            )
        return out

    def forward_last_block(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Not available alone (the method's last block needs more than its input); use
        :meth:`forward_intermediates` and its ``pre_ln_post``."""
        raise TypeError(
            f"{type(self).__name__}.forward_last_block: this method's last block needs more than its input; "
            "use forward_intermediates (its 'pre_ln_post')"
        )

    # ------------------------------------------------------------------ forward
    def forward_intermediates(self, images: Tensor, text: Tensor | None = None) -> dict[str, Tensor]:
        """Everything of one forward: ``dense`` ``[B, T, D]``, ``last_block_in`` / ``pre_ln_post`` ``[B, T,
        E]``, ``qk`` (RCS layers), and with SFR ``temp_probs`` ``[B, Q, H, W]``, ``labels`` ``[B, gh, gw]``,
        ``sfr`` ``[B, T, T]`` (before the /max and fp16 rounding)."""
        if self.sfr and text is None:
            raise ValueError("text: ResCLIP with sfr=True needs the query features [Q, D]; got None")
        if text is not None and (
            not isinstance(text, Tensor) or text.ndim != 2 or text.shape[1] != self.output_dim
        ):
            raise ValueError(
                f"text: expected query features [Q, {self.output_dim}], got {getattr(text, 'shape', text)}"
            )
        x, grid = self._embed(images)
        x, _, qk = run_blocks(self, x, qk_layers=self._layers if self.rcs else ())
        out: dict[str, Tensor] = {"last_block_in": x, "qk": qk}
        s16 = None
        if self.sfr:
            out["temp_probs"], out["labels"] = self._first_pass(x, grid, qk, images, text)
            out["sfr"] = self._sfr_matrix(out["labels"])
            top = out["sfr"].flatten(1).amax(dim=1).view(-1, 1, 1)
            s16 = (out["sfr"] / top).to(torch.float16)
        out["pre_ln_post"] = self._last_block(x, grid, qk, s16)
        out["dense"] = self.project(out["pre_ln_post"])
        return out

    def forward(self, images: Tensor, text: Tensor | None = None) -> Tensor:
        """Dense features ``[B, 1 + gh*gw, output_dim]`` (token 0 = CLS; not L2-normalised)."""
        return self.forward_intermediates(images, text)["dense"]
