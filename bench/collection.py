"""Collection throughput: images/s of ``naclip segment DIR`` under ``torchrun`` with 1 and 2 processes on
one folder of synthetic images, side by side in one run.

Model: random-init open_clip ``ViT-B-16`` (``--pretrained none``, no download; the weights do not change
the cost), float32, ``whole`` mode at ``--short-side`` (default 224), PAMR as the default, 3 classes,
masks and overlays written. Each configuration is launched with ``python -m torch.distributed.run --standalone
--nproc_per_node N -m naclip segment ...`` and ``OMP_NUM_THREADS`` threads per process; ``images_per_s`` is
the run's own figure from ``<out>/manifest.jsonl`` (images done / span from the first rank starting its
first image to the last rank finishing, model load and text features excluded), ``wall_s`` the whole
command. Configurations are interleaved over ``--repeats``; medians are reported with the load average
(the machine may be shared: the ratio within one run is what counts).

Usage::

    python -m bench.collection            # -> bench/results/collection_cpu.{json,md}
    python -m bench.collection --images 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench._meta import machine_info, write_text

CLASSES = "sky, cloud; tree; road"
#: (label, processes, threads per process)
CONFIGS = (("1 process x 2 threads", 1, 2), ("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1))


def _make_images(folder: Path, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        x = (np.arange(w)[None, :, None] + 11 * i) % 128 * 2
        img = np.broadcast_to(x, (h, w, 3)) + rng.integers(0, 40, (h, w, 3))
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(sub / f"tile{i:04d}.png")


def _run_once(src: Path, out: Path, procs: int, threads: int, short_side: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "naclip", "segment", str(src), "--recursive", "--out", str(out), "--classes", CLASSES,
           "--model", "ViT-B-16", "--pretrained", "none", "--device", "cpu", "--mode", "whole",
           "--short-side", str(short_side), "--no-progress"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    header = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    return {"wall_s": wall, "segment_s": header["timing"]["segment_s"], "done": header["counts"]["done"]}


def _markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# naclip segment: collection throughput (CPU)",
        "",
        f"{res['config']['images']} synthetic {res['config']['size'][0]}x{res['config']['size'][1]} PNGs, "
        f"ViT-B-16 random init, whole mode, short side {res['config']['short_side']}, fp32. "
        f"{m['cpu_model']}, {m['cpu_count']} CPUs; load average at start {m['loadavg_at_start']}, at end "
        f"{res['loadavg_at_end']} (shared machine: compare the ratios). git {m['git_sha']}.",
        "",
        "| configuration | images/s (median) | vs 1 process x 2 threads | wall s (median, incl. start-up) |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['images_per_s']:.3f} | {r['ratio']:.2f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    p.add_argument("--short-side", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    machine = machine_info("cpu", threads=None)
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        _make_images(src, args.images, tuple(args.size))
        for rep in range(args.repeats):
            for label, procs, threads in CONFIGS:
                out = Path(tmp) / f"out_{procs}_{threads}_{rep}"
                runs[label].append(_run_once(src, out, procs, threads, args.short_side))
                assert runs[label][-1]["done"] == args.images
    rows = []
    for label, procs, threads in CONFIGS:
        seg = statistics.median(r["segment_s"] for r in runs[label])
        wall = statistics.median(r["wall_s"] for r in runs[label])
        rows.append({"config": label, "processes": procs, "threads_per_process": threads,
                     "images_per_s": args.images / seg, "segment_s_median": seg, "wall_s": wall,
                     "runs": runs[label]})  # fmt: skip
    for r in rows:
        r["ratio"] = r["images_per_s"] / rows[0]["images_per_s"]
    res = {
        "benchmark": "collection",
        "config": {"model": "ViT-B-16 (random init)", "mode": "whole", "short_side": args.short_side,
                   "images": args.images, "size": list(args.size), "classes": CLASSES, "dtype": "fp32",
                   "repeats": args.repeats},
        "machine": machine,
        "loadavg_at_end": os.getloadavg(),
        "rows": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "collection_cpu.json", json.dumps(res, indent=2) + "\n")
    write_text(out / "collection_cpu.md", _markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
