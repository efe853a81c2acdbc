"""Benchmark evaluation with mmseg's protocol, without mmcv/mmseg.

* :mod:`naclip.eval.datasets`: readers for the 8 benchmark layouts (:class:`EvalDataset`, :data:`DATASETS`).
* :mod:`naclip.eval.metrics`: joint histogram -> IoU / Acc / mIoU / mAcc / aAcc (:func:`compute_metrics`).
* :mod:`naclip.eval.runner`: the resumable, distributed evaluation loop (:func:`evaluate`).
* ``python -m naclip.eval``: ``naclip eval`` (:mod:`naclip.cli.eval`), the entry point for torchrun.
* :mod:`naclip.eval.convert_coco_object`: COCO-Object labels from COCO-Stuff.
"""

from naclip.eval.datasets import DATASETS, EvalDataset
from naclip.eval.metrics import Metrics, compute_metrics, joint_histogram
from naclip.eval.runner import EvalOutcome, evaluate

__all__ = [
    "DATASETS",
    "EvalDataset",
    "EvalOutcome",
    "Metrics",
    "compute_metrics",
    "evaluate",
    "joint_histogram",
]
