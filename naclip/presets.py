"""The 8 benchmark presets of the official NACLIP configs (spec §3).

Every preset fixes the class list (with synonyms), the background threshold ``prob_thd``, the resize
``(long_side, short_side)`` and the inference mode (``whole`` for VOC21/VOC20 in the v2 code, ``slide``
224/112 elsewhere). Class lists live in ``naclip/data/classes.json`` (this package's own format: a class is a
string or ``{"name", "synonyms"}``); their queries equal the official ``configs/cls_*.txt`` files line by
line, except that surrounding whitespace is stripped from every query (the official ``cls_context60.txt`` ends
with ``"wood "``; the CLIP tokenizer produces identical tokens for both spellings). Display names differ from
the first query for the background line of VOC21 / COCO-Object (``"background"``) and VOC's ``boat`` /
``diningtable`` / ``tvmonitor`` (queried as ``ship`` / ``table`` / ``television monitor, ...``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from naclip.text import ClassSpec, parse_classes

__all__ = ["Preset", "PRESETS", "PRESET_NAMES", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """Settings of one benchmark: classes, ``prob_thd``, resize and inference mode (PAMR on by default)."""

    name: str
    title: str
    classes: ClassSpec
    prob_thd: float
    short_side: int
    long_side: int = 2048
    mode: str = "slide"
    pamr: bool = True
    #: method-specific settings (``naclip.methods.method_preset``); ``None`` = the SegmentConfig default
    crop: int | None = None
    stride: int | None = None
    logit_scale: float | None = None
    area_thd: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.names


# name -> (title, prob_thd, short_side, mode); per spec §3 (v2 code).
_SETTINGS = {
    "voc21": ("PASCAL VOC 2012 with background (21 classes)", 0.1, 336, "whole"),
    "voc20": ("PASCAL VOC 2012 without background (20 classes)", 0.0, 336, "whole"),
    "context60": ("PASCAL Context with background (60 classes)", 0.1, 336, "slide"),
    "context59": ("PASCAL Context without background (59 classes)", 0.0, 336, "slide"),
    "coco_object": ("COCO-Object with background (81 classes)", 0.1, 336, "slide"),
    "coco_stuff": ("COCO-Stuff 164k (171 classes)", 0.0, 336, "slide"),
    "cityscapes": ("Cityscapes (19 classes)", 0.0, 560, "slide"),
    "ade20k": ("ADE20K (150 classes)", 0.0, 336, "slide"),
}
PRESET_NAMES: tuple[str, ...] = tuple(_SETTINGS)


def _class_spec(entries: list) -> ClassSpec:
    lines, names = [], []
    for e in entries:
        if isinstance(e, str):
            lines.append(e)
            names.append(e)
        else:
            lines.append(", ".join(e["synonyms"]))
            names.append(e["name"])
    return parse_classes(lines, names=names)


@cache
def _load() -> MappingProxyType:
    data = json.loads(resources.files("naclip").joinpath("data/classes.json").read_text(encoding="utf-8"))
    if data.get("format") != "naclip-classes/1":
        raise RuntimeError(f"naclip/data/classes.json: unknown format {data.get('format')!r}")
    out = {}
    for name, (title, thd, short, mode) in _SETTINGS.items():
        spec = _class_spec(data["presets"][name])
        out[name] = Preset(name=name, title=title, classes=spec, prob_thd=thd, short_side=short, mode=mode)
    return MappingProxyType(out)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (one of :data:`PRESET_NAMES`); ``ValueError`` listing them otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"preset: expected a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _SETTINGS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {', '.join(PRESET_NAMES)}")
    return _load()[key]


class _Presets(Mapping):
    """Read-only mapping ``PRESETS[name] -> Preset`` (class lists loaded lazily from the package data).

    Keys are exactly :data:`PRESET_NAMES` (lower case, ``_``): ``PRESETS["VOC21"]`` raises ``KeyError`` like
    any mapping, while :func:`get_preset` normalises case, surrounding spaces and ``-`` (``"VOC21"``,
    ``"pascal-context59"``).
    """

    def __getitem__(self, name: str) -> Preset:
        if name not in _SETTINGS:
            raise KeyError(name)
        return get_preset(name)

    def __iter__(self) -> Iterator[str]:
        return iter(PRESET_NAMES)

    def __len__(self) -> int:
        return len(PRESET_NAMES)

    def __repr__(self) -> str:
        return f"PRESETS({', '.join(PRESET_NAMES)})"


PRESETS: Mapping[str, Preset] = _Presets()
