"""The NACLIP case kinds of the golden fixtures, each through naclip's public API (see
:mod:`naclip.testing.replay_fixtures` for the table); add-on methods go through
:mod:`naclip.testing.replay_methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from naclip.testing.fixtures import FixturesError, Tensors

__all__ = ["Runner"]


class Runner:
    """Holds the fixtures, the tiny model (built once) and the per-kind case functions."""

    def __init__(self, root: Path, manifest: dict, backend: str, device: str):
        import torch

        self.torch = torch
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.device = torch.device(device)
        self.tensors = Tensors(root)
        from naclip.inference import CLIP_MEAN, CLIP_STD

        conv = manifest.get("conventions", {}).get("image_normalisation", {})
        if not isinstance(conv, dict):  # the add-on manifests state it in words ("identical to ...")
            conv = {}
        for key, ours in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
            theirs = conv.get(key, ours)
            same = len(theirs) == len(ours) and torch.equal(
                torch.tensor(theirs, dtype=torch.float32), torch.tensor(ours, dtype=torch.float32)
            )
            if not same:
                raise FixturesError(
                    f"manifest conventions.image_normalisation.{key}: expected naclip.inference.CLIP_"
                    f"{key.upper()} = {list(ours)} (float32), got {theirs!r}"
                )
        self._visual = None
        from naclip.testing.replay_methods import adapter_for

        self.adapter = adapter_for(manifest)

    def run(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        """Run one case: the method adapter's function for this kind, else NACLIP's."""
        kind = case["kind"]
        if self.adapter is not None:
            if kind not in self.adapter:
                raise FixturesError(f"case kind {kind!r} is not supported for this method")
            return self.adapter[kind](self, case, emit)
        if kind == "dense_forward_raises":
            raise FixturesError("dense_forward_raises cases exist only for add-on methods")
        return getattr(self, kind)(case, emit)

    # -- shared helpers

    def normalise(self, u8):
        """uint8 RGB ``[B,3,H,W]`` -> float32 ``(x - CLIP_MEAN) / CLIP_STD``
        (:func:`naclip.inference.normalize`; the manifest's conventions were checked to hold these values)."""
        from naclip.inference import normalize

        if u8.dim() != 4 or u8.shape[1] != 3:
            raise FixturesError(f"expected a uint8 image [B, 3, H, W], got shape {tuple(u8.shape)}")
        return normalize(u8.to(self.torch.float32)).to(self.device)

    def visual(self):
        """The open_clip VisionTransformer built from the manifest's model block (built once)."""
        if self._visual is None:
            from naclip.testing.tiny import build_visual_from_manifest

            if "model" not in self.manifest:
                raise FixturesError("manifest has no 'model' block; cannot build the tiny ViT")
            weights = self.tensors.file(str(self.manifest.get("weights", "weights.safetensors")))
            self._visual = build_visual_from_manifest(self.manifest["model"], weights).to(self.device).eval()
        return self._visual

    def naclip_visual(self, case: dict):
        from naclip.model import NaclipVisual

        kw: dict[str, Any] = {
            "arch": case.get("arch", "reduced"),
            "strategy": case.get("attn_strategy", "naclip"),
        }
        if case.get("gaussian_std") is not None:
            kw["gaussian_std"] = float(case["gaussian_std"])
        return NaclipVisual(self.visual(), backend=self.backend, **kw)

    def inp(self, case: dict, name: str):
        return self.tensors.get(case["file"], case["inputs"][name], case.get("batch"))

    def out(self, case: dict, name: str):
        return self.tensors.get(case["file"], case["outputs"][name])

    # -- kinds

    def dense_forward(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        torch = self.torch
        nv = self.naclip_visual(case)
        images = self.normalise(self.inp(case, "image"))
        outputs = case["outputs"]
        with torch.no_grad():
            emit("dense", nv(images))
            if "last_block_in" in outputs or "pre_ln_post" in outputs:
                x_in = nv.last_block_input(images)
                if "last_block_in" in outputs:
                    emit("last_block_in", x_in)
                if "pre_ln_post" in outputs:
                    emit("pre_ln_post", nv.forward_last_block(x_in, tuple(case["grid_hw"])))

    def pos_embed(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        gh, gw = case["grid_hw"]
        nv = self.naclip_visual(case)
        with self.torch.no_grad():
            pe = nv.interpolate_pos_embed(int(gh), int(gw))
        emit("pos_embed", pe.reshape(1, -1, pe.shape[-1]))

    def gaussian_bias(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        import naclip_kernels

        grid = tuple(int(g) for g in case["grid_hw"])
        emit("addition", naclip_kernels.gaussian_bias(grid, float(case["gaussian_std"]), num_prefix_tokens=1))

    def kernel(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        import torch.nn.functional as F

        from naclip import strategies

        torch = self.torch
        x = self.inp(case, "x").to(self.device)
        w_in = self.inp(case, "in_proj_weight").to(self.device)
        b_in = self.inp(case, "in_proj_bias").to(self.device)
        heads = int(case["num_heads"])
        B, T, E = x.shape
        if E % heads:
            raise FixturesError(f"embed dim {E} is not divisible by num_heads {heads}")
        d = E // heads
        grid = tuple(int(g) for g in case["grid_hw"])
        if 1 + grid[0] * grid[1] != T:
            raise FixturesError(f"grid {grid} does not match {T} tokens (1 + gh*gw)")
        std = case.get("gaussian_std")
        name = case["attn_strategy"]
        # [B, T, 3E] -> three [B, H, T, d] strided views (no copies)
        q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in F.linear(x, w_in, b_in).chunk(3, -1))
        with torch.no_grad():
            strategy = strategies.get_strategy(name)
            attn = strategy(q, k, v, grid, std, self.backend)
            out_pre = attn.transpose(1, 2).reshape(B, T, E)
            emit("out_pre_proj", out_pre)
            if "out" in case["outputs"]:
                w_out = self.inp(case, "out_proj_weight").to(self.device)
                b_out = self.inp(case, "out_proj_bias").to(self.device)
                emit("out", F.linear(out_pre, w_out, b_out))
            if "attn_probs" in case["outputs"]:
                # the float32 softmax matrix from naclip_kernels.reference_attention_probs, per the strategy
                emit("attn_probs", strategy.probs(q, k, grid, std))
            if "nonly_bias_multiplier" in case:
                emit("nonly_bias_multiplier", strategies.nonly_bias_multiplier(q, k)[:1])

    def pipeline(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        from naclip.segmenter import Segmenter

        torch = self.torch
        kw: dict[str, Any] = {
            "method": case.get("attn_strategy", "naclip"),
            "arch": case.get("arch", "reduced"),
        }
        if case.get("gaussian_std") is not None:
            kw["gaussian_std"] = float(case["gaussian_std"])
        seg = Segmenter(self.visual(), None, backend=self.backend, **kw)  # a bare image tower: features only
        image = self.normalise(self.inp(case, "image"))
        feats = self.inp(case, "query_features").to(self.device)
        qidx = self.inp(case, "query_idx").to(torch.int64)
        crop = int(case.get("slide_crop", 0) or 0)
        opts: dict[str, Any] = {
            "ori_shape": tuple(int(s) for s in case["ori_shape"]),
            "mode": "slide" if crop > 0 else "whole",
            "pamr_steps": int(case.get("pamr_steps", 0)),
            "pamr_dilations": tuple(int(d) for d in case.get("pamr_dilations", (8, 16))),
            "prob_thd": float(case.get("prob_thd", 0.0)),
            "return_logits": True,
        }
        if "num_classes" in case:
            opts["num_classes"] = int(case["num_classes"])
        if "logit_scale" in case:
            opts["logit_scale"] = float(case["logit_scale"])
        if crop > 0:
            opts["crop"] = crop
            opts["stride"] = int(case.get("slide_stride", crop // 2))
        with torch.no_grad():
            res = seg.predict_from_features(image, feats, qidx, **opts)
        emit("seg_probs", res.probs)
        emit("pred", res.labels)
        emit("slide_logits", res.logits[None])  # [Q, H, W] -> [1, Q, H, W]

    def pamr(self, case: dict, emit: Callable[[str, Any], None]) -> None:
        from naclip.pamr import pamr

        image = self.inp(case, "image").to(self.device)
        mask = self.inp(case, "mask").to(self.device)
        with self.torch.no_grad():
            out = pamr(image, mask, num_iter=int(case["num_iter"]), dilations=tuple(case["dilations"]))
        emit("out", out)
