"""Fixture cases of the other training-free methods (``../shared/reference/addons/<method>``), for
:mod:`naclip.testing.replay_fixtures`.

The manifest's ``method`` field selects the adapter (:data:`ADAPTERS`); each maps the official case fields to
naclip's public API and emits every stored output:

* ClearCLIP: ``build_visual("clearclip", arch=reduced|vanilla)`` (``qq`` attention) or the ``vanilla``
  strategy; the dense output is compared on the patch rows only.
* SCLIP: ``build_visual("sclip")`` (``csa``) or the ``vanilla`` strategy, arch ``vanilla``.
* ResCLIP: :meth:`~naclip.methods.resclip.ResclipVisual.forward_intermediates` (first-pass maps, SFR bias)
  and the RCS maps from the kept ``q_l, k_l``.
* SC-CLIP: :meth:`~naclip.methods.scclip.ScclipVisual.forward_intermediates`; ``dense_forward_raises``
  (the official crash on non-square grids) checks that ours runs and finds the recorded outlier set.

Pipeline cases run :meth:`naclip.Segmenter.predict_from_features` with the method's post-processing style;
the official config maps to it as: ``slide_crop > 0`` -> slide, else whole; PAMR only where the official
segmentor applies it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ADAPTERS", "adapter_for"]

Emit = Callable[[str, Any], None]


def _method_name(manifest_method: str) -> str:
    return manifest_method.lower().replace("-", "").replace("_", "")


def adapter_for(manifest: dict):
    """The adapter of the manifest's ``method`` (``None`` for NACLIP's own fixtures)."""
    name = manifest.get("method")
    if name is None or _method_name(str(name)) == "naclip":
        return None
    key = _method_name(str(name))
    if key not in ADAPTERS:
        raise ValueError(f"manifest method {name!r} is not one of {sorted(ADAPTERS)} (or NACLIP)")
    return ADAPTERS[key]


# ------------------------------------------------------------------------------------------------ per method


def _clearclip_visual(runner, case):
    from naclip.methods import build_visual

    arch = "reduced" if case.get("ignore_residual", True) else "vanilla"
    name = "clearclip" if case.get("model_type", "ClearCLIP") == "ClearCLIP" else "vanilla"
    return build_visual(name, runner.visual(), arch=arch, backend=runner.backend)


def _sclip_visual(runner, case):
    from naclip.methods import build_visual

    return build_visual(
        "sclip" if case.get("csa", True) else "vanilla",
        runner.visual(),
        arch="vanilla",
        backend=runner.backend,
    )


def _resclip_params(case) -> dict:
    return {
        "rcs": bool(case.get("use_rcs", True)),
        "sfr": bool(case.get("use_sfr", True)),
        "rcs_layers": tuple(case["rcs_layers"]),
        "rcs_weights": tuple(case["attn_rcs_weights"]),
        "sfr_weights": tuple(case["attn_sfr_weights"]),
        "temp_thd": float(case["temp_thd"]),
        "delete_same_entity": bool(case["delete_same_entity"]),
        "logit_scale": float(case.get("logit_scale", 40)),
    }


def _resclip_visual(runner, case):
    from naclip.methods import build_visual

    arch = {"wo_resi": "reduced", "w_resi": "vanilla"}[case.get("arch", "wo_resi")]
    return build_visual(
        "resclip",
        runner.visual(),
        arch=arch,
        gaussian_std=float(case.get("gaussian_std", 5)),
        backend=runner.backend,
        params=_resclip_params(case),
    )


def _scclip_params(case) -> dict:
    keys = ("pre_adjust_idx", "post_adjust_idx", "multi_start_idx", "multi_end_idx")
    out: dict[str, Any] = {k: int(case[k]) for k in keys}
    out["res_cls"] = float(case.get("res_cls", 0.3))
    if "beta" in case:
        out["beta"] = float(case["beta"])
    if "lof_n_neighbors" in case:
        out["lof_neighbors"] = int(case["lof_n_neighbors"])
        out["lof_contamination"] = float(case["lof_contamination"])
    return out


def _scclip_visual(runner, case):
    from naclip.methods import build_visual

    return build_visual("scclip", runner.visual(), backend=runner.backend, params=_scclip_params(case))


# ------------------------------------------------------------------------------------------------ dense kinds


def _dense_plain(visual_fn, prefix: int):
    def run(runner, case: dict, emit: Emit) -> None:
        nv = visual_fn(runner, case)
        images = runner.normalise(runner.inp(case, "image"))
        with torch.no_grad():
            emit("dense", nv(images)[:, prefix:])
            x_in = nv.last_block_input(images)
            emit("last_block_in", x_in)
            emit("pre_ln_post", nv.forward_last_block(x_in, tuple(case["grid_hw"])))

    return run


def _resclip_dense(runner, case: dict, emit: Emit) -> None:
    from naclip_kernels import reference_attention_probs

    nv = _resclip_visual(runner, case)
    images = runner.normalise(runner.inp(case, "image"))
    text = runner.inp(case, "query_features").to(runner.device)
    with torch.no_grad():
        out = nv.forward_intermediates(images, text if nv.sfr else None)
    emit("dense", out["dense"])
    emit("last_block_in", out["last_block_in"])
    emit("pre_ln_post", out["pre_ln_post"].transpose(0, 1))  # stored in the official LND layout [T, B, E]
    if out["qk"]:
        grid = tuple(case["grid_hw"])
        maps = [reference_attention_probs(q, k, grid, None) for q, k in out["qk"].values()]
        emit("attention_rcs", torch.stack(maps).mean(dim=0).flatten(0, 1))  # [B*H, T, T], index b*H + h
    if "labels" in out:
        emit("seg_logit_temp", out["temp_probs"])
        emit("patch_logit_temp", out["labels"][0])
        emit("attention_sfr", out["sfr"])


def _scclip_dense(runner, case: dict, emit: Emit) -> None:
    nv = _scclip_visual(runner, case)
    images = runner.normalise(runner.inp(case, "image"))
    with torch.no_grad():
        out = nv.forward_intermediates(images)
    for name in ("dense", "pre_ln_post", "mid_simi", "last_attn_out", "multi_attn_out"):
        emit(name, out[name])
    emit("outlier_indices", torch.nonzero(out["outliers"][0]).flatten())
    emit("LOF_scores", out["lof"][0])
    for i, block_out in enumerate(out["block_outputs"]):
        emit(f"block{i}_out", block_out)


def _scclip_raises(runner, case: dict, emit: Emit) -> None:
    """The official code raises IndexError here (``idx // gh`` on a non-square grid); ours must run, find the
    same outliers (recorded before the crash) and give finite patch features."""
    nv = _scclip_visual(runner, case)
    images = runner.normalise(runner.inp(case, "image"))
    with torch.no_grad():
        out = nv.forward_intermediates(images)
    gh, gw = case["grid_hw"]
    emit("outlier_indices", torch.nonzero(out["outliers"][0]).flatten())
    if tuple(out["dense"].shape[:2]) != (1, gh * gw) or not torch.isfinite(out["dense"]).all():
        raise RuntimeError(f"dense output has shape {tuple(out['dense'].shape)} or non-finite values")


# ------------------------------------------------------------------------------------------------ pipeline


def _pipeline(method: str, kwargs_fn, *, pamr_whole: bool):
    def run(runner, case: dict, emit: Emit) -> None:
        from naclip.segmenter import Segmenter

        seg = Segmenter(runner.visual(), None, method=method, backend=runner.backend, **kwargs_fn(case))
        image = runner.normalise(runner.inp(case, "image"))
        feats = runner.inp(case, "query_features").to(runner.device)
        qidx = runner.inp(case, "query_idx").to(torch.int64)
        crop = int(case.get("slide_crop", 0) or 0)
        steps = int(case.get("pamr_steps", 0) or 0)
        opts: dict[str, Any] = {
            "ori_shape": tuple(int(s) for s in case["ori_shape"]),
            "mode": "slide" if crop > 0 else "whole",
            "pamr_steps": steps if (crop > 0 or pamr_whole) else 0,
            "pamr_dilations": tuple(int(d) for d in case.get("pamr_dilations", (8, 16))),
            "prob_thd": float(case.get("prob_thd", 0.0)),
            "logit_scale": float(case.get("logit_scale", 40)),
            "area_thd": case.get("area_thd"),
            "num_classes": int(case["num_classes"]),
            "return_logits": True,
        }
        if crop > 0:
            opts["crop"], opts["stride"] = crop, int(case.get("slide_stride", crop // 2))
        with torch.no_grad():
            res = seg.predict_from_features(image, feats, qidx, **opts)
        emit("seg_probs", res.probs)
        emit("pred", res.labels)
        logits = res.logits[None]
        emit("logits", F.interpolate(logits, size=opts["ori_shape"], mode="bilinear", align_corners=False))

    return run


def _adapter(name, kwargs_fn, dense, raises=None) -> dict:
    from naclip.methods import get_method

    pamr_whole = get_method(name).style.pamr_in_whole
    out = {"dense_forward": dense, "pipeline": _pipeline(name, kwargs_fn, pamr_whole=pamr_whole)}
    if raises is not None:
        out["dense_forward_raises"] = raises
    return out


def _no_kwargs(case: dict) -> dict:
    return {}


def _clearclip_kwargs(case: dict) -> dict:
    return {"arch": "reduced" if case.get("ignore_residual", True) else "vanilla"}


def _resclip_kwargs(case: dict) -> dict:
    params = _resclip_params({"temp_thd": 0.25, "delete_same_entity": True, **case})
    return {"gaussian_std": float(case.get("gaussian_std", 5)), "method_params": params}


def _scclip_kwargs(case: dict) -> dict:
    return {"method_params": _scclip_params(case)}


#: normalised manifest method name -> {case kind: run(runner, case, emit)}
ADAPTERS: dict[str, dict[str, Callable]] = {
    "clearclip": _adapter("clearclip", _clearclip_kwargs, _dense_plain(_clearclip_visual, 1)),
    "sclip": _adapter("sclip", _no_kwargs, _dense_plain(_sclip_visual, 0)),
    "resclip": _adapter("resclip", _resclip_kwargs, _resclip_dense),
    "scclip": _adapter("scclip", _scclip_kwargs, _scclip_dense, raises=_scclip_raises),
}
