"""Text-encoding benchmark: plain open_clip vs naclip (short context, cold and warm disk cache), side by side.

Model: random-init open_clip ``ViT-B-16`` (``pretrained=None``, no download), float32, on the CPU with
``torch.set_num_threads(--threads)`` (default 2). Two parts, one run:

* ``text``: 12 VOC class names x the 80 ImageNet templates, repeated ``--repeats`` times, interleaved:
  ``plain`` = open_clip ``encode_text`` on the full 77-token context, 8 queries (640 prompts) per call,
  under ``torch.no_grad`` (what naclip did before); ``cold`` = :func:`naclip.text.encode_queries` (no
  cache); ``warm`` = a fresh :class:`naclip.Segmenter` on a filled disk cache (weights hash + reads; no
  in-memory hit). The max abs difference to ``plain`` is reported (exactness).
* ``voc21`` (skip with ``--no-cli``): ``naclip segment --preset voc21`` on one 500x375 image with the model
  saved as a local checkpoint (``--checkpoint``), each run a fresh process; time from process start to the
  first mask on disk. ``before`` = the same command with ``--before-tree`` on ``PYTHONPATH`` (e.g.
  ``/work/main``, the code before this change: full-context text, no disk cache), ``cold`` = an empty
  ``NACLIP_CACHE_DIR``, ``warm`` = the second run on that cache.

Usage::

    python bench/text.py                               # -> bench/results/text_cpu.{json,md}
    python bench/text.py --repeats 1 --no-cli           # quick
    python bench/text.py --before-tree /work/main       # also time the previous code's voc21 start
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._meta import machine_info, write_text  # noqa: E402

QUERIES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus",
    "car", "cat", "chair", "cow", "dining table", "dog",
]  # fmt: skip


def plain_open_clip(model, tokenizer, queries, templates, per_call: int = 8):
    """The pre-change computation: full-context ``encode_text``, ``per_call`` queries per call."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(queries), per_call):
            chunk = queries[i : i + per_call]
            emb = model.encode_text(tokenizer([t.format(c=q) for q in chunk for t in templates])).float()
            emb = (emb / emb.norm(dim=-1, keepdim=True)).view(len(chunk), len(templates), -1).mean(1)
            out.append(emb / emb.norm(dim=-1, keepdim=True))
    return torch.cat(out)


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def bench_text(model, tokenizer, repeats: int, cache_dir: Path) -> dict:
    from naclip import Segmenter
    from naclip.text import TEMPLATES, encode_queries, text_encoding_path

    def warm():
        seg = Segmenter(model, tokenizer, text_cache=cache_dir)
        return seg.text_features(QUERIES)[0]

    times: dict[str, list[float]] = {"plain": [], "cold": [], "warm": []}
    ref = warm().cpu()  # fills the disk cache (and warms up); compared with the plain result below
    diff = 0.0
    for r in range(repeats):
        for name in ("plain", "cold", "warm"):
            fn = {
                "plain": lambda: plain_open_clip(model, tokenizer, QUERIES, TEMPLATES),
                "cold": lambda: encode_queries(model, tokenizer, QUERIES, templates=TEMPLATES),
                "warm": warm,
            }[name]
            dt, value = _timed(fn)
            times[name].append(dt)
            diff = max(diff, float((value.cpu() - ref).abs().max()))
            print(f"text repeat {r}: {name} {dt:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "queries": len(QUERIES),
        "templates": len(TEMPLATES),
        "encoding_path": text_encoding_path(model)[0],
        "times_s": times,
        "median_s": med,
        "median_s_per_query": {k: v / len(QUERIES) for k, v in med.items()},
        "speedup_cold_vs_plain": med["plain"] / med["cold"],
        "speedup_warm_vs_plain": med["plain"] / med["warm"],
        "max_abs_diff_vs_plain": diff,
    }


def _first_image_s(cmd: list[str], env: dict, out: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # cwd: not the source tree, so PYTHONPATH decides which naclip runs
        cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first = None
    while proc.poll() is None:
        if first is None and any(out.glob("*_mask.png")):
            first = time.perf_counter() - t0
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return first if first is not None else time.perf_counter() - t0


def bench_voc21(tmp: Path, ckpt: Path, before_tree: str | None, threads: int) -> dict:
    import numpy as np
    from PIL import Image

    img = tmp / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(img)
    base = [
        sys.executable,
        "-m",
        "naclip",
        "segment",
        str(img),
        "--preset",
        "voc21",
        "--checkpoint",
        str(ckpt),
    ]
    base += ["--device", "cpu", "--no-progress", "--no-overlay"]
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), NACLIP_CACHE_DIR=str(tmp / "cache")
    )
    runs: dict[str, float] = {}
    if before_tree:
        runs["before"] = _first_image_s(
            [*base, "--out", str(tmp / "o-before")], dict(env, PYTHONPATH=before_tree), tmp / "o-before"
        )
    env["PYTHONPATH"] = str(REPO)
    for name in ("cold", "warm"):
        runs[name] = _first_image_s([*base, "--out", str(tmp / f"o-{name}")], env, tmp / f"o-{name}")
        print(f"voc21 {name}: {runs[name]:.1f} s to the first image", file=sys.stderr)
    return {"time_to_first_image_s": runs, "before_tree": before_tree}


def _markdown(res: dict) -> str:
    t = res["text"]
    m, pq = t["median_s"], t["median_s_per_query"]
    lines = [
        f"Text features, {t['queries']} queries x {t['templates']} templates, random-init ViT-B-16 fp32, "
        f"{res['machine']['torch_threads']} threads, load at start {res['machine']['loadavg_at_start']}",
        "",
        "| | total (s) | per query (s) | vs plain |",
        "|---|---:|---:|---:|",
        f"| plain open_clip (full 77-token context) | {m['plain']:.2f} | {pq['plain']:.3f} | 1.0x |",
        f"| naclip cold (short context, no cache) | {m['cold']:.2f} | {pq['cold']:.3f} | "
        f"{t['speedup_cold_vs_plain']:.1f}x |",
        f"| naclip warm (disk cache hit) | {m['warm']:.3f} | {pq['warm']:.4f} | "
        f"{t['speedup_warm_vs_plain']:.0f}x |",
        "",
        f"max abs diff naclip vs plain: {t['max_abs_diff_vs_plain']:.2e} (path {t['encoding_path']})",
    ]
    if "voc21" in res:
        lines += ["", "| naclip segment --preset voc21, time to first image (s) | |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in res["voc21"]["time_to_first_image_s"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cli", action="store_true", help="skip the voc21 time-to-first-image runs")
    p.add_argument(
        "--before-tree", metavar="DIR", help="source tree of the code before (for the voc21 'before')"
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "text_cpu"), help="results path stem")
    args = p.parse_args(argv)

    import open_clip
    import torch

    torch.set_num_threads(args.threads)
    machine = machine_info("cpu", threads=args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with tempfile.TemporaryDirectory(prefix="naclip-bench-text-") as d:
        tmp = Path(d)
        res = {"machine": machine, "text": bench_text(model, tokenizer, args.repeats, tmp / "text-cache")}
        if not args.no_cli:
            ckpt = tmp / "vit-b-16-random.pt"
            torch.save(model.state_dict(), ckpt)
            del model
            res["voc21"] = bench_voc21(tmp, ckpt, args.before_tree, args.threads)
    res["loadavg_at_end"] = os.getloadavg()
    write_text(args.out + ".json", json.dumps(res, indent=1))
    write_text(args.out + ".md", _markdown(res))
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
