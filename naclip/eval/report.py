"""``results.json`` / ``results.md`` / ``confusion.npy`` of an evaluation (written atomically, rank 0
only)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from naclip.eval.metrics import Metrics
from naclip.io import atomic_write

__all__ = [
    "build_results",
    "environment_info",
    "git_state",
    "markdown_table",
    "naclip_version",
    "unique_names",
    "write_outputs",
]

RESULTS_FORMAT = 1


def _pct(x: float) -> float | None:
    return None if x is None or math.isnan(x) else 100.0 * float(x)


def unique_names(names: list[str]) -> list[str]:
    """Class names made unique for use as JSON keys (a repeated name gets ``#<index>`` appended)."""
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [n if seen[n] == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _dist_version(dist: str) -> str | None:
    """Installed distribution version from its metadata, None when it is not installed."""
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - metadata missing in a source checkout
        return None


def naclip_version() -> str | None:
    """``naclip.__version__`` when the package defines one, else the installed distribution's version
    (``importlib.metadata``), else None."""
    import naclip

    v = getattr(naclip, "__version__", None)
    return str(v) if v else _dist_version("naclip")


def git_state() -> dict:
    """``{"git_sha": HEAD or None, "git_dirty": bool or None}`` of the git checkout holding this source.

    Both are None for an installed copy (e.g. site-packages inside another repository), without git, or when
    git fails; ``git_dirty`` is True only when ``git status --porcelain`` ran and listed changes.
    """
    here = Path(__file__).resolve()

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=here.parent, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    unknown = {"git_sha": None, "git_dirty": None}
    top = git("rev-parse", "--show-toplevel")
    if not top or (Path(top) / "naclip" / "eval" / here.name).resolve() != here:
        return unknown  # not the naclip source checkout
    sha = git("rev-parse", "HEAD")
    if not sha:
        return unknown  # e.g. no commit yet
    status = git("status", "--porcelain")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def environment_info(device: str | None = None) -> dict:
    """Versions (python, naclip, torch, open_clip, numpy, pillow), CUDA device name, and :func:`git_state`
    (git sha and dirty flag of the source): ``{"versions": {...}, "git_sha": ..., "git_dirty": ...}``.

    The one place that collects this; the benchmarks (``bench/_meta.py``) build on it."""
    import PIL
    import torch

    info = {
        "python": platform.python_version(),
        "naclip": naclip_version(),
        "torch": torch.__version__,
        "open_clip": _dist_version("open_clip_torch"),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return {"versions": info, **git_state()}


def build_results(
    *,
    dataset: str,
    title: str,
    split: str,
    root: str,
    class_names: list[str],
    metrics: Metrics,
    num_images: int,
    config: dict,
    run: dict,
    timing: dict,
    paper: dict | None = None,
    env: dict | None = None,
) -> dict:
    """The ``results.json`` dict: ``mIoU``, ``aAcc``, ``mAcc`` and ``per_class`` (name -> IoU) in percent
    (null = undefined class, excluded from the means), plus configuration, label statistics, timing,
    versions."""
    if len(class_names) != metrics.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {metrics.num_classes} classes")
    names = unique_names(list(class_names))
    res = {
        "format": f"naclip-eval-results/{RESULTS_FORMAT}",
        "dataset": dataset,
        "title": title,
        "split": split,
        "root": root,
        "num_images": num_images,
        "num_classes": metrics.num_classes,
        "mIoU": _pct(metrics.miou),
        "aAcc": _pct(metrics.aacc),
        "mAcc": _pct(metrics.macc),
        "per_class": {n: _pct(v) for n, v in zip(names, metrics.iou, strict=True)},
        "per_class_acc": {n: _pct(v) for n, v in zip(names, metrics.acc, strict=True)},
        "paper": paper,
        "label_stats": {
            "labelled_pixels": int(metrics.area_label.sum()),
            "ignored_pixels": metrics.ignored_pixels,
            "out_of_range_label_pixels": {str(k): v for k, v in metrics.out_of_range_label_pixels.items()},
            "out_of_range_pred_pixels": metrics.out_of_range_pred_pixels,
        },
        "config": config,
        "run": run,
        "timing": timing,
    }
    if env is not None:
        res.update(env)
    return res


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown_table(results: dict) -> str:
    """Summary + per-class Markdown tables of a results dict (values in percent, 2 decimals)."""
    lines = [f"## {results['title']}: {results['split']} ({results['num_images']} images)", ""]
    head = "| mIoU | aAcc | mAcc |"
    row = f"| {_fmt(results['mIoU'])} | {_fmt(results['aAcc'])} | {_fmt(results['mAcc'])} |"
    sep = "|---:|---:|---:|"
    paper = results.get("paper")
    if paper:
        head += " paper mIoU | Δ |"
        ref = paper["mIoU"]
        delta = None if results["mIoU"] is None or ref is None else results["mIoU"] - ref
        row += f" {'n/r' if ref is None else f'{ref:.2f}'} | {'n/a' if delta is None else f'{delta:+.2f}'} |"
        sep += "---:|---:|"
    lines += [head, sep, row, ""]
    if paper:
        lines += [f"Paper number: {paper['source']}.", ""]
    lines += ["| class | IoU | Acc |", "|---|---:|---:|"]
    for name, iou in results["per_class"].items():
        lines.append(f"| {name} | {_fmt(iou)} | {_fmt(results['per_class_acc'][name])} |")
    return "\n".join(lines) + "\n"


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_outputs(out_dir: str | os.PathLike, results: dict, hist) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``confusion.npy`` (the ``[256, 256]`` int64 joint histogram,
    rows = ground-truth value, columns = predicted value) into ``out_dir`` atomically; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "confusion": out / "confusion.npy"}
    _write_bytes(paths["json"], (json.dumps(results, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    _write_bytes(paths["md"], markdown_table(results).encode("utf-8"))
    arr = np.ascontiguousarray(
        np.asarray(hist.cpu().numpy() if hasattr(hist, "cpu") else hist, dtype=np.int64)
    )
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    _write_bytes(paths["confusion"], buf.getvalue())
    return paths
