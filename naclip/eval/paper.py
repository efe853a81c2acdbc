"""mIoU (%) reported for NACLIP and the other methods, OpenAI CLIP ViT-B/16, for ``naclip eval --paper``.

NACLIP: ``naclip-spec.md`` §4.

* ``with_pamr``: the README of the official v2 code (Sep 2024), PAMR on (10 iterations, dilations (8, 16));
  this is what ``--paper`` reproduces by default (the paper's post-processed row equals it rounded to 1
  decimal).
* ``without_pamr``: the paper's "no post-processing" row (arXiv 2404.08181; independently re-run to the same
  values in PH-Reg's Table 1), reproduced by ``--paper --no-pamr``.

The official numbers come from an fp16 pipeline on GPU (weights, attention, text features, logits); a float32
run can differ in the second decimal.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["METHOD_PAPER_MIOU", "PAPER_MIOU", "paper_average", "paper_miou"]

PAPER_MIOU = MappingProxyType(
    {
        "voc21": MappingProxyType({"with_pamr": 64.07, "without_pamr": 58.9}),
        "context60": MappingProxyType({"with_pamr": 34.99, "without_pamr": 32.2}),
        "coco_object": MappingProxyType({"with_pamr": 36.19, "without_pamr": 33.2}),
        "voc20": MappingProxyType({"with_pamr": 83.03, "without_pamr": 79.7}),
        "cityscapes": MappingProxyType({"with_pamr": 38.27, "without_pamr": 35.5}),
        "context59": MappingProxyType({"with_pamr": 38.35, "without_pamr": 35.2}),
        "ade20k": MappingProxyType({"with_pamr": 19.05, "without_pamr": 17.4}),
        "coco_stuff": MappingProxyType({"with_pamr": 25.69, "without_pamr": 23.3}),
    }
)


_ORDER = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")


def _row(values: tuple[float, ...]) -> MappingProxyType:
    return MappingProxyType(dict(zip(_ORDER, values, strict=True)))


#: method -> (per-dataset mIoU, source): the other methods' reported numbers (ViT-B/16, no post-processing),
#: as collected in the project's field notes (``field-notes.md`` §1); n/r where a number is absent.
METHOD_PAPER_MIOU = MappingProxyType(
    {
        "clearclip": (
            _row((51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7)),
            "ClearCLIP paper (as in ResCLIP's table)",
        ),
        "sclip": (
            _row((59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1)),
            "SCLIP paper (as in Trident / ResCLIP)",
        ),
        "resclip": (
            _row((61.1, 33.5, 35.0, 86.0, 36.8, 24.7, 35.9, 18.0)),
            "ResCLIP on NACLIP, official result figure",
        ),
        "scclip": (
            _row((64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1)),
            "SC-CLIP (two independent notes agree)",
        ),
    }
)


def paper_average(method: str) -> float | None:
    """Mean of a method's 8 reported numbers (``None`` when one is missing); NACLIP's without PAMR."""
    if method == "naclip":
        values = [PAPER_MIOU[d]["without_pamr"] for d in _ORDER]
    elif method in METHOD_PAPER_MIOU:
        values = [METHOD_PAPER_MIOU[method][0].get(d) for d in _ORDER]
    else:
        return None
    return None if None in values else round(sum(values) / len(values), 1)


def paper_miou(dataset: str, pamr: bool, method: str = "naclip") -> tuple[float | None, str]:
    """``(mIoU %, source description)`` reported for ``dataset`` (a key of PAPER_MIOU) with/without PAMR;
    for another ``method`` its number without post-processing, ``(None, "n/r ...")`` when not reported."""
    if method != "naclip":
        if method not in METHOD_PAPER_MIOU:
            return None, f"n/r (no reported number for method {method!r})"
        row, source = METHOD_PAPER_MIOU[method]
        if dataset not in row:
            return None, f"n/r ({source} has no {dataset})"
        return row[dataset], f"{source} (ViT-B/16, no post-processing)"
    if dataset not in PAPER_MIOU:
        raise ValueError(f"dataset: no reported number for {dataset!r}; expected one of {sorted(PAPER_MIOU)}")
    if pamr:
        return PAPER_MIOU[dataset]["with_pamr"], "official README v2 (ViT-B/16, PAMR on)"
    return PAPER_MIOU[dataset]["without_pamr"], "paper, no post-processing (ViT-B/16)"
