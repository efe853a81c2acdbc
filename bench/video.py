"""Video throughput: frames/s of :func:`naclip.video.segment_video` (decode + model + PAMR + overlay encode),
batch 1 vs batch N side by side in one run.

Model: random-init open_clip ``ViT-B-16`` (``pretrained=None``, no download; the weights do not change the
cost), float32, ``torch.set_num_threads`` (default 2), ``whole`` mode at short side 336, PAMR on (the
default), 3 classes. The clip is synthetic (``--frames`` frames of ``--size`` at 30 frame/s, H.264). Text
features are computed once before the timed runs (as the CLI does). Each configuration runs ``--repeats``
times, interleaved; the median is reported, with the machine's load average (the machine is shared, so the
ratio within the run is what counts).

Usage::

    python -m bench.video                      # -> bench/results/video_cpu.json
    python -m bench.video --frames 8 --repeats 1 --batches 1 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from bench._meta import machine_info, write_text

CLASSES = "sky, cloud; tree; road"


def _make_clip(path: Path, frames: int, width: int, height: int) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(30))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            x = (np.arange(width)[None, :, None] + 7 * i) % 128 * 2
            noise = rng.integers(0, 30, (height, width, 3))
            img = np.broadcast_to(x, (height, width, 3)).astype(np.uint8) + noise
            c.mux(s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")))
        c.mux(s.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=(640, 360), metavar=("W", "H"))
    p.add_argument("--batches", type=int, nargs="+", default=(1, 8))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = machine_info("cpu", threads=args.threads)

    from naclip import Segmenter, video

    seg = Segmenter.from_pretrained("ViT-B-16", None, device="cpu")
    seg.text_features(CLASSES)
    times: dict[int, list[float]] = {b: [] for b in args.batches}
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        _make_clip(clip, args.frames, *args.size)
        for _ in range(args.repeats):
            for b in args.batches:
                t0 = time.perf_counter()
                rep = video.segment_video(seg, clip, CLASSES, overlay=Path(tmp) / f"o{b}.mp4", batch=b)
                times[b].append(time.perf_counter() - t0)
                assert rep["frames"] == args.frames
    rows = [
        {"batch": b, "median_s": statistics.median(t), "frames_per_s": args.frames / statistics.median(t),
         "runs_s": t}
        for b, t in times.items()
    ]  # fmt: skip
    base = rows[0]["frames_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["frames_per_s"] / base
    res = {
        "benchmark": "video",
        "config": {"model": "ViT-B-16 (random init)", "mode": "whole", "short_side": 336, "pamr": True,
                   "frames": args.frames, "size": list(args.size), "classes": CLASSES, "dtype": "fp32"},
        "machine": machine,
        "loadavg_at_end": os.getloadavg(),
        "rows": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "video_cpu.json", json.dumps(res, indent=2) + "\n")
    for r in rows:
        print(f"batch {r['batch']}: {r['frames_per_s']:.2f} frames/s (median {r['median_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
