"""mIoU (%) reported for NACLIP, OpenAI CLIP ViT-B/16 (``naclip-spec.md`` §4), for ``naclip eval --paper``.

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

__all__ = ["PAPER_MIOU", "paper_miou"]

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


def paper_miou(dataset: str, pamr: bool) -> tuple[float, str]:
    """``(mIoU %, source description)`` reported for ``dataset`` (a key of PAPER_MIOU) with/without PAMR."""
    if dataset not in PAPER_MIOU:
        raise ValueError(f"dataset: no reported number for {dataset!r}; expected one of {sorted(PAPER_MIOU)}")
    if pamr:
        return PAPER_MIOU[dataset]["with_pamr"], "official README v2 (ViT-B/16, PAMR on)"
    return PAPER_MIOU[dataset]["without_pamr"], "paper, no post-processing (ViT-B/16)"
