"""Evaluation loop: data loading with workers, prediction, per-image histograms, resume log, ranks.

:func:`evaluate` runs a ``predictor`` (``predict(image uint8 [H, W, 3] RGB) -> labels int [H, W]``, at the
image's original resolution) over a :class:`naclip.eval.datasets.EvalDataset` (or scores the dataset's stored
predictions when ``predictor`` is None) and returns the dataset-level joint histogram and its metrics.

* **Order**: images are visited in dataset order (``DataLoader`` with ``shuffle=False``; workers only decode).
* **Resume**: with ``log_dir``, each finished image's histogram is appended to ``log_dir/rank<r>.log`` and
  fsynced (:mod:`naclip.eval.records`); a later call with the same ``fingerprint`` skips the logged images.
  The final histogram is the integer sum of the logged and the new per-image histograms: bit-identical to an
  uninterrupted run, nothing lost or counted twice.
* **Workers** die with their parent: each DataLoader worker asks the Linux kernel for ``SIGKILL`` when the
  evaluating process dies (``prctl(PR_SET_PDEATHSIG)``), and elsewhere watches its parent's pid and exits
  when it changes; a ``SIGKILL``-ed ``naclip eval`` leaves no worker behind.
* **Ranks**: when ``torch.distributed`` is initialised with ``W`` ranks, every rank reads the logs, the images
  still to do are dealt round-robin (``todo[rank::W]``), and the new histograms are summed with ``all_reduce``
  (gloo on CPU, NCCL on CUDA); every rank returns the same result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from naclip import distributed
from naclip._validate import check_int
from naclip.eval.datasets import EvalDataset
from naclip.eval.metrics import HIST_SIZE, Metrics, compute_metrics, joint_histogram
from naclip.eval.records import RecordLog, read_logs, records_to_hist

__all__ = ["EvalOutcome", "Predictor", "evaluate", "select_indices"]

Predictor = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class EvalOutcome:
    """Result of :func:`evaluate`. ``hist``: ``[256, 256]`` int64 dataset joint histogram over ``indices``;
    ``resumed``: images taken from the logs; ``processed``: images predicted in this call (all ranks);
    ``timing``: seconds (``wall``, and this rank's ``data_wait``, ``predict``, ``record``) and
    ``images_per_s``."""

    hist: torch.Tensor
    metrics: Metrics
    indices: tuple[int, ...]
    resumed: int
    processed: int
    torn_bytes: int
    timing: dict = field(default_factory=dict)


def select_indices(n: int, limit: int | None) -> list[int]:
    """The first ``limit`` indices of ``range(n)`` (all when ``limit`` is None)."""
    if limit is None:
        return list(range(n))
    return list(range(min(n, check_int("limit", limit, minimum=1, expected="a positive int or None"))))


def _first(batch: list[dict]) -> dict:
    return batch[0]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCH_PERIOD_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process end when ``parent_pid`` ends: ``PR_SET_PDEATHSIG`` on Linux, else a daemon
    thread polling the parent pid. The parent may already be gone when this runs: checked afterwards."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(_WATCH_PERIOD_S)
            os._exit(1)

        threading.Thread(target=watch, name="naclip-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the guard was armed
        os._exit(1)


class _WorkerInit:
    """Picklable ``worker_init_fn`` (spawn start methods too) arming :func:`_die_with_parent`."""

    def __init__(self) -> None:
        self.parent_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        _die_with_parent(self.parent_pid)


def _all_reduce_sum(hist: torch.Tensor) -> torch.Tensor:
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = hist.to(device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def _as_label_tensor(pred: object, shape: tuple[int, int], sample_id: str) -> torch.Tensor:
    if isinstance(pred, np.ndarray):
        pred = torch.from_numpy(pred)
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"predictor must return a tensor or ndarray of labels, got {type(pred).__name__}")
    if tuple(pred.shape) != tuple(shape):
        raise ValueError(
            f"prediction for image {sample_id!r} has shape {tuple(pred.shape)}; "
            f"expected the label's {tuple(shape)}"
        )
    return pred


def evaluate(
    dataset: EvalDataset,
    predictor: Predictor | None = None,
    *,
    indices: Sequence[int] | None = None,
    log_dir: str | Path | None = None,
    fingerprint: dict | None = None,
    num_workers: int = 0,
    progress: bool = False,
    progress_desc: str | None = None,
    on_prediction: Callable[[dict, torch.Tensor], None] | None = None,
) -> EvalOutcome:
    """Evaluate ``predictor`` on ``dataset[indices]`` (all images by default); see the module docstring.

    Args:
        dataset: the benchmark split.
        predictor: ``f(image uint8 [H, W, 3]) -> int labels [H, W]``; None scores ``item["pred"]`` (dataset
            built with ``pred_dir``).
        indices: dataset indices to evaluate (e.g. :func:`select_indices` for ``--limit``).
        log_dir: folder for the resumable progress logs; None disables resuming.
        fingerprint: JSON-able dict identifying the run (dataset, model, settings); required with ``log_dir``.
            Logs with a different fingerprint are refused (ValueError naming the differing keys).
        num_workers: DataLoader worker processes (0 = load in this process).
        progress: show a tqdm bar (images/s, ETA, running mIoU) on rank 0's stderr.
        on_prediction: called as ``on_prediction(item, labels)`` after each prediction, before the image is
            logged as done (e.g. to save the predicted label map).
    """
    idx = _check_arguments(dataset, predictor, indices, log_dir, fingerprint, num_workers)
    rank, world = distributed.rank_world()
    t_start = time.perf_counter()
    log_dir = Path(log_dir) if log_dir is not None else None
    done, torn = _read_progress(log_dir, fingerprint)
    resumed_idx = [i for i in idx if i in done]
    prev_hist = records_to_hist(done, resumed_idx)
    todo = [i for i in idx if i not in done]
    if world > 1:
        dist.barrier()  # every rank has read the logs before anyone appends
    mine = todo[rank::world]
    log = RecordLog(log_dir / f"rank{rank}.log", fingerprint) if log_dir is not None else None
    bar = None
    if progress and rank == 0:
        bar = _progress_bar(len(mine), progress_desc or dataset.name, len(resumed_idx), len(idx))
    loop = _Loop(predictor, on_prediction, log, bar, prev_hist, dataset.num_classes, world)
    try:
        loop.run(_loader(dataset, mine, num_workers))
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    processed, new_hist = len(mine), loop.hist
    if world > 1:
        new_hist = _all_reduce_sum(loop.hist)
        counts = torch.tensor([processed], dtype=torch.int64)
        processed = int(_all_reduce_sum(counts.reshape(1, 1)).item())
    hist = prev_hist + new_hist
    _cross_check_logs(log_dir, fingerprint, idx, hist, rank=rank, world=world)
    return EvalOutcome(
        hist=hist,
        metrics=compute_metrics(hist, dataset.num_classes),
        indices=tuple(idx),
        resumed=len(resumed_idx),
        processed=processed,
        torn_bytes=torn,
        timing=loop.timing(time.perf_counter() - t_start, len(mine)),
    )


def _check_arguments(dataset, predictor, indices, log_dir, fingerprint, num_workers) -> list[int]:
    """:func:`evaluate`'s argument checks; returns the indices to evaluate."""
    if predictor is None and dataset.pred_paths is None:
        raise ValueError("predictor is None but the dataset has no pred_dir: nothing to score")
    check_int("num_workers", num_workers, minimum=0)
    n = len(dataset)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices must lie in 0..{n - 1}, got e.g. {bad[:3]}")
    if len(set(idx)) != len(idx):
        raise ValueError("indices must not repeat")
    if log_dir is not None and fingerprint is None:
        raise ValueError("fingerprint is required when log_dir is given")
    return idx


def _read_progress(log_dir: Path | None, fingerprint: dict | None) -> tuple[dict, int]:
    """``(records of the images already done, torn bytes)`` from ``log_dir`` (created if missing)."""
    if log_dir is None:
        return {}, 0
    log_dir.mkdir(parents=True, exist_ok=True)
    return read_logs(list(log_dir.glob("rank*.log")), fingerprint)


def _loader(dataset: EvalDataset, mine: list[int], num_workers: int) -> DataLoader:
    return DataLoader(
        Subset(dataset, mine),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_first,
        persistent_workers=False,
        worker_init_fn=_WorkerInit() if num_workers > 0 else None,
    )


def _progress_bar(total: int, desc: str, resumed: int, selected: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    if resumed:
        bar.write(f"resuming: {resumed} of {selected} images already done", file=sys.stderr)
    return bar


class _Loop:
    """The per-image loop of :func:`evaluate`: predict (or read the stored prediction), histogram, log,
    progress; accumulates this rank's histogram and the time spent waiting for data / predicting /
    recording."""

    def __init__(self, predictor, on_prediction, log, bar, prev_hist, num_classes, world) -> None:
        self.predictor, self.on_prediction, self.log, self.bar = predictor, on_prediction, log, bar
        self.prev_hist, self.num_classes, self.world = prev_hist, num_classes, world
        self.hist = torch.zeros(HIST_SIZE, HIST_SIZE, dtype=torch.int64)
        self.t_data = self.t_pred = self.t_rec = 0.0

    def run(self, loader: DataLoader) -> None:
        t0 = time.perf_counter()
        for item in loader:
            t1 = time.perf_counter()
            pred = self._predict(item)
            t2 = time.perf_counter()
            self._record(item, pred)
            t3 = time.perf_counter()
            self.t_data, self.t_pred, self.t_rec = (
                self.t_data + t1 - t0,
                self.t_pred + t2 - t1,
                self.t_rec + t3 - t2,
            )
            self._show()
            t0 = time.perf_counter()

    def _predict(self, item: dict) -> torch.Tensor:
        if self.predictor is None:
            pred = torch.from_numpy(item["pred"])
        else:
            pred = _as_label_tensor(self.predictor(item["image"]), item["label"].shape, item["id"])
        if self.on_prediction is not None:
            self.on_prediction(item, pred)
        return pred

    def _record(self, item: dict, pred: torch.Tensor) -> None:
        h = joint_histogram(item["label"], pred)
        if self.log is not None:
            self.log.append(item["index"], h)
        self.hist += h

    def _show(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        m = compute_metrics(self.prev_hist + self.hist, self.num_classes)
        suffix = f" (rank 0 of {self.world})" if self.world > 1 else ""
        self.bar.set_postfix_str(f"mIoU {100 * m.miou:.2f}" + suffix)

    def timing(self, wall: float, count: int) -> dict:
        busy = self.t_data + self.t_pred + self.t_rec
        return {
            "wall_s": wall,
            "data_wait_s": self.t_data,
            "predict_s": self.t_pred,
            "record_s": self.t_rec,
            "images_per_s": (count / busy) if count else None,
        }


def _cross_check_logs(
    log_dir: Path | None,
    fingerprint: dict | None,
    idx: list[int],
    hist: torch.Tensor,
    *,
    rank: int,
    world: int,
) -> None:
    """Rank 0: the logs now hold exactly the selected images and sum to ``hist`` (``RuntimeError``
    otherwise: the folder was modified during the run); every rank meets at the barrier first."""
    if log_dir is None:
        return
    if world > 1:
        dist.barrier()
    if rank != 0:
        return
    recs, _ = read_logs(list(log_dir.glob("rank*.log")), fingerprint)
    missing = set(idx) - recs.keys()
    if missing or not torch.equal(records_to_hist(recs, idx), hist):
        raise RuntimeError(
            f"progress logs in {log_dir} disagree with the in-memory result "
            f"({len(missing)} selected images not logged); the folder was modified during the run"
        )
