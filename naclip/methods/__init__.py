"""Training-free methods on one model and kernel: NACLIP, ClearCLIP, SCLIP, ResCLIP (RCS + SFR) and SC-CLIP.

A method is a :class:`Method`: a declarative description (the last block's ``arch`` + attention strategy of
:mod:`naclip.strategies`, or one extra stage: :class:`~naclip.methods.resclip.ResclipVisual`'s feedback pass,
:class:`~naclip.methods.scclip.ScclipVisual`'s outlier repair), its post-processing style
(:class:`PipelineStyle`), the official segmentor defaults (``config``: :class:`naclip.segmenter.SegmentConfig`
fields) and per-dataset overrides (``presets``: :class:`naclip.presets.Preset` fields plus ``params``).

:func:`build_visual` makes the dense-feature module, :func:`method_preset` the method's view of a benchmark
preset. Official code, fixtures, quirks and deviations of each method: ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from naclip.methods._params import RESCLIP_PARAMS, SCCLIP_PARAMS

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "Method",
    "PipelineStyle",
    "build_visual",
    "get_method",
    "method_preset",
]


@dataclass(frozen=True)
class PipelineStyle:
    """How a method's segmentor post-processes (the differences from NACLIP's pipeline).

    Attributes:
        renormalize: probabilities divided by their sum over classes (NACLIP, ResCLIP); ``False`` keeps the
            max-over-synonyms probabilities (ClearCLIP, SCLIP, SC-CLIP).
        whole_to_output: whole mode resizes the patch logits straight to the output size (one bilinear
            resize) instead of to the input size and then to the output size.
        pad_crops: sliding-window crops are zero-padded to a multiple of the patch (``l = pad_w // 2``, ``t =
            pad_h // 2``, the rest right / bottom) and their logits cut back (ClearCLIP).
        pamr_in_whole: PAMR also runs in whole mode (``False``: only on the slide path, SCLIP / SC-CLIP).
    """

    renormalize: bool = True
    whole_to_output: bool = False
    pad_crops: bool = False
    pamr_in_whole: bool = True


@dataclass(frozen=True)
class Method:
    """One training-free method (see the module docstring)."""

    name: str
    title: str
    source: str
    changes: str
    extra_cost: str
    builder: Callable[..., nn.Module]
    style: PipelineStyle = PipelineStyle()
    config: Mapping[str, Any] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    params: tuple[str, ...] = ()


def _naclip(visual, *, arch=None, gaussian_std=None, backend=None, strategy="naclip"):
    from naclip.model import NaclipVisual
    from naclip.strategies import get_strategy

    arch = arch or get_strategy(strategy).required_arch or "reduced"
    std = 5.0 if gaussian_std is None else gaussian_std
    return NaclipVisual(visual, arch=arch, strategy=strategy, gaussian_std=std, backend=backend)


def _clearclip(visual, *, arch=None, gaussian_std=None, backend=None):
    return _naclip(visual, arch=arch or "reduced", backend=backend, strategy="qq")


def _sclip(visual, *, arch=None, gaussian_std=None, backend=None):
    if arch not in (None, "vanilla"):
        raise ValueError(f"arch: SCLIP keeps the residual and MLP (arch='vanilla'), got {arch!r}")
    return _naclip(visual, arch="vanilla", backend=backend, strategy="csa")


def _resclip(visual, *, arch=None, gaussian_std=None, backend=None, **params):
    from naclip.methods.resclip import ResclipVisual

    std = 5.0 if gaussian_std is None else gaussian_std
    return ResclipVisual(visual, arch=arch or "reduced", gaussian_std=std, backend=backend, **params)


def _scclip(visual, *, arch=None, gaussian_std=None, backend=None, **params):
    from naclip.methods.scclip import ScclipVisual

    if arch not in (None, "reduced"):
        raise ValueError(f"arch: SC-CLIP's last block has no residual (arch='reduced'), got {arch!r}")
    return ScclipVisual(visual, backend=backend, **params)


_NO_RENORM = PipelineStyle(renormalize=False, whole_to_output=True, pamr_in_whole=False)
_RESCLIP_DATASETS = {
    # name: (temp_thd, rcs_weights, sfr_weights, prob_thd, whole) from the official configs/cfg_*.py
    "voc21": (0.50, (2.0, 0.3), (2.2, 0.7), 0.1, True),
    "voc20": (0.10, (2.0, 0.6), (2.1, 0.6), 0.0, True),
    "context60": (0.30, (2.0, 0.3), (1.8, 0.7), 0.1, False),
    "context59": (0.25, (2.0, 0.4), (1.8, 0.7), 0.0, False),
    "coco_object": (0.11, (2.0, 0.4), (1.8, 0.7), 0.1, False),
    "coco_stuff": (0.11, (2.0, 0.4), (1.8, 0.7), 0.0, False),
    "cityscapes": (0.10, (2.0, 0.2), (2.1, 0.6), 0.0, False),
    "ade20k": (0.25, (2.0, 0.3), (2.1, 0.7), 0.0, False),
}


def _resclip_presets() -> dict[str, dict[str, Any]]:
    out = {}
    for name, (thd, rcs, sfr, prob, whole) in _RESCLIP_DATASETS.items():
        p: dict[str, Any] = {
            "prob_thd": prob,
            "params": {"temp_thd": thd, "rcs_weights": rcs, "sfr_weights": sfr},
        }
        if whole:
            p["mode"] = "whole"
        if name == "cityscapes":
            p["short_side"] = 560
        out[name] = p
    return out


_SLIDE = {"mode": "slide", "crop": 224, "stride": 112, "short_side": 336, "pamr": False, "prob_thd": 0.0}

METHODS: Mapping[str, Method] = MappingProxyType(
    {
        m.name: m
        for m in (
            Method(
                "naclip",
                "NACLIP (WACV 2025)",
                "sinahmr/NACLIP",
                "reduced last block, softmax(s K K^T + G) V (Gaussian neighbourhood)",
                "baseline",
                _naclip,
            ),
            Method(
                "clearclip",
                "ClearCLIP (ECCV 2024)",
                "mc-lan/ClearCLIP@ad68a40",
                "reduced last block, softmax(s Q Q^T) V, no Gaussian; padded crops; no renormalisation",
                "same as NACLIP (one fused attention); crop 448 instead of 224",
                _clearclip,
                style=PipelineStyle(renormalize=False, whole_to_output=True, pad_crops=True),
                config={
                    "mode": "slide",
                    "crop": 448,
                    "stride": 224,
                    "short_side": 448,
                    "pamr": False,
                    "prob_thd": 0.0,
                    "logit_scale": 50.0,
                },
                presets={
                    "voc21": {"prob_thd": 0.5},
                    "context60": {"prob_thd": 0.15},
                    "coco_object": {"prob_thd": 0.4},
                    "cityscapes": {"crop": 224, "stride": 224},
                },
            ),
            Method(
                "sclip",
                "SCLIP (ECCV 2024)",
                "wangf3014/SCLIP@b56bd30",
                "last block keeps residual + MLP, (softmax(s Q Q^T) + softmax(s K K^T)) V; area threshold",
                "two fused attentions in the last block + its MLP",
                _sclip,
                style=_NO_RENORM,
                config={**_SLIDE, "logit_scale": 40.0},
                presets={
                    "voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1},
                    "context60": {"logit_scale": 50.0, "prob_thd": 0.1},
                    "coco_object": {"logit_scale": 50.0, "prob_thd": 0.1},
                    "coco_stuff": {"short_side": 448},
                    "cityscapes": {"short_side": 560},
                },
            ),
            Method(
                "resclip",
                "ResCLIP (CVPR 2025)",
                "yvhangyang/ResCLIP@0e085f7",
                "NACLIP + RCS (mean attention of intermediate blocks) + SFR (bias from a first pass + PAMR)",
                "a second last-block pass, first-pass PAMR, one fused attention per RCS layer, "
                "a dense N x N SFR softmax",
                _resclip,
                config={**_SLIDE, "logit_scale": 40.0},
                presets=_resclip_presets(),
                params=RESCLIP_PARAMS,
            ),
            Method(
                "scclip",
                "SC-CLIP (arXiv 2411.15869)",
                "SuleBai/SC-CLIP@0417ba9",
                "LOF outlier repair, similarity-guided reduced last block, multi-level fusion, no CLS",
                "LOF (N x N distances), two last-block attentions, dense N x N similarity maps",
                _scclip,
                style=_NO_RENORM,
                config={**_SLIDE, "logit_scale": 40.0},
                presets={
                    "voc21": {"area_thd": 0.1, "logit_scale": 50.0, "prob_thd": 0.15},
                    "context60": {"prob_thd": 0.15},
                    "coco_object": {"logit_scale": 55.0, "prob_thd": 0.35},
                    "cityscapes": {"short_side": 560},
                },
                params=SCCLIP_PARAMS,
            ),
        )
    }
)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name`` (one of :data:`METHOD_NAMES`); ``ValueError`` listing them otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHOD_NAMES)}, got {name!r}")
    return METHODS[name]


def build_visual(
    name: str,
    visual,
    *,
    arch: str | None = None,
    gaussian_std: float | None = None,
    backend: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Dense-feature module of method ``name`` (a method of :data:`METHODS`, or an ablation strategy of
    :data:`naclip.strategies.STRATEGIES`) on an open_clip ``VisionTransformer``; ``params`` are the method's
    parameters (:attr:`Method.params`; ``ValueError`` for others)."""
    from naclip.strategies import STRATEGIES

    params = dict(params or {})
    if name not in METHODS and name in STRATEGIES:
        method, extra = METHODS["naclip"], {"strategy": name}
    elif name in METHODS:
        method, extra = METHODS[name], {}
    else:
        raise ValueError(
            f"method: expected one of {', '.join(METHOD_NAMES)} or an ablation strategy "
            f"({', '.join(s for s in STRATEGIES if s not in METHODS)}), got {name!r}"
        )
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        raise ValueError(
            f"method_params: {method.name} takes {list(method.params) or 'no parameters'}, "
            f"got unknown {unknown}"
        )
    return method.builder(visual, arch=arch, gaussian_std=gaussian_std, backend=backend, **extra, **params)


def method_config(name: str | None) -> dict[str, Any]:
    """The :class:`naclip.segmenter.SegmentConfig` overrides of method ``name`` (its official segmentor
    defaults; ``{}`` for NACLIP, its ablation strategies and ``None``)."""
    method = METHODS.get(name) if name is not None else None
    return dict(method.config) if method is not None else {}


def method_preset(name: str, preset):
    """``preset`` (a :class:`naclip.presets.Preset`) as method ``name`` runs it: NACLIP's presets unchanged;
    for another method its official segmentor defaults (:attr:`Method.config`) and per-dataset overrides
    (:attr:`Method.presets`) replace the preset's settings (only the classes are kept)."""
    method = METHODS.get(name)
    if method is None or method.name == "naclip":
        return preset
    keys = {f.name for f in dataclasses.fields(preset)}
    values = {k: v for k, v in method.config.items() if k in keys}
    values.update(method.presets.get(preset.name, {}))
    return dataclasses.replace(preset, **values)
