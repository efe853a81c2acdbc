"""Throughput (images/s) of the ``naclip eval`` loop on a synthetic VOC-like set: sliding-window crops batched
through the ViT vs one crop per forward (the official per-crop loop).

Usage::

    python -m bench.eval_speed [--quick] [--images 8] [--size 375x500] [--device cpu] [--model ViT-B-16]
                               [--workers 2] [--pamr] [--out bench/results]

What runs: :func:`naclip.eval.runner.evaluate` (DataLoader workers, prediction, per-image histogram, fsynced
progress log) with a random-init open_clip model (``pretrained=None``: speed does not depend on the weights)
wrapped in :class:`naclip.Segmenter`, on ``--images`` synthetic ``voc21``-layout images of ``--size`` (VOC's
typical 375x500; resized to short side 336 -> 336x448 -> 2x3 = 6 windows of 224 at stride 112). Variants:

* ``slide-batched``: ``mode="slide"``, crops batched (``SegmentConfig.memory_budget`` default, 2 GiB: all
  6 crops in one forward);
* ``slide-loop``: ``mode="slide"`` with ``memory_budget=1`` -> one crop per forward (emulates the loop of the
  official code);
* ``whole``: ``mode="whole"`` (one 336x448 pass; VOC21/VOC20's paper setting), for reference.

The text classifier (80 templates x 56 VOC21 queries) is computed once before timing and reported separately
(``text_s``) with a 1-block text tower unless ``--full-text`` (the image tower is the model's); every variant
reuses the same Segmenter (only its ``config`` changes), so all see the same weights and cached text features.
images/s = images / (sum of per-image loader wait + predict + record time) of the measured pass, after
``--warmup`` images. PAMR is off unless ``--pamr`` (it does not depend on the variant). Writes
``eval_speed_<device>[_quick].json`` atomically into ``--out`` (with ``machine``: host, CPU, versions, git sha
and dirty flag, see ``bench/_meta.py``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from bench._meta import machine_info, write_text

VARIANTS = ("slide-batched", "slide-loop", "whole")


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 375x500, got {text!r}") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"expected both sides >= 16, got {text!r}")
    return h, w


def _small_text_variant(model: str, folder: Path) -> str:
    """Register ``<model>-smalltext``: the same image tower, a 1-block width-64 text tower (the text
    classifier runs once per evaluation and does not enter images/s; the full ViT-B-16 text tower takes
    minutes on CPU)."""
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise SystemExit(f"unknown open_clip model {model!r}")
    cfg = dict(cfg, text_cfg=dict(cfg["text_cfg"], width=64, heads=1, layers=1))
    name = f"{model}-smalltext"
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def run(args: argparse.Namespace) -> dict:
    import torch

    from naclip.eval.datasets import EvalDataset
    from naclip.eval.runner import evaluate
    from naclip.eval.synthetic import make_synthetic_dataset
    from naclip.presets import get_preset
    from naclip.segmenter import Segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = machine_info(device)  # before the run: the load average at start
    tmp = Path(tempfile.mkdtemp(prefix="naclip-eval-speed-"))
    n = args.images + args.warmup
    make_synthetic_dataset("voc21", tmp / "voc", num_images=n, sizes=[args.size], seed=0)
    dataset = EvalDataset("voc21", tmp / "voc")

    model_name = args.model
    if not args.full_text:
        model_name = _small_text_variant(args.model, tmp)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    seg = Segmenter.from_pretrained(model_name, None, device=device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    preset = get_preset("voc21")
    t0 = time.perf_counter()
    seg.text_features(preset.classes)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    text_s = time.perf_counter() - t0
    base_cfg = seg.config

    rows = []
    for variant in args.variants:
        mode = "whole" if variant == "whole" else "slide"
        budget = 1 if variant == "slide-loop" else base_cfg.memory_budget
        seg.config = dataclasses.replace(base_cfg, memory_budget=budget)

        def predict(image, mode=mode):
            labels = seg.predict(image, preset="voc21", mode=mode, pamr=args.pamr).labels
            return labels

        if args.warmup:
            evaluate(dataset, predict, indices=range(args.warmup), num_workers=0)
        out = evaluate(
            dataset,
            predict,
            indices=range(args.warmup, n),
            log_dir=tmp / f"log-{variant}",
            fingerprint={"variant": variant},
            num_workers=args.workers,
        )
        t = out.timing
        rows.append(
            {
                "variant": variant,
                "mode": mode,
                "memory_budget": budget,
                "images": args.images,
                "images_per_s": t["images_per_s"],
                "s_per_image": 1.0 / t["images_per_s"],
                "predict_s": t["predict_s"],
                "data_wait_s": t["data_wait_s"],
                "record_s": t["record_s"],
                "mIoU_random_weights": None
                if out.metrics.miou != out.metrics.miou
                else 100 * out.metrics.miou,
            }
        )
        print(f"{variant}: {t['images_per_s']:.3f} images/s", file=sys.stderr)
    seg.config = base_cfg
    by = {r["variant"]: r for r in rows}
    speedup = None
    if "slide-batched" in by and "slide-loop" in by:
        speedup = by["slide-batched"]["images_per_s"] / by["slide-loop"]["images_per_s"]
    return {
        "benchmark": "eval_speed",
        "machine": machine,
        "model": args.model,
        "weights": "random init",
        "text_tower": "full" if args.full_text else "1 block, width 64 (image tower unchanged)",
        "device": device,
        "dtype": str(seg.dtype),
        "torch_threads": torch.get_num_threads(),
        "image_size_hw": list(args.size),
        "short_side": preset.short_side,
        "pamr": args.pamr,
        "workers": args.workers,
        "warmup_images": args.warmup,
        "model_load_s": load_s,
        "text_s": text_s,
        "rows": rows,
        "slide_batched_over_loop": speedup,
    }


def markdown(res: dict) -> str:
    lines = [
        f"eval speed: {res['model']} ({res['weights']}), {res['device']} {res['dtype']}, "
        f"{res['torch_threads']} threads, images {res['image_size_hw'][0]}x{res['image_size_hw'][1]}, "
        f"PAMR {'on' if res['pamr'] else 'off'}, {res['workers']} loader workers",
        "",
        "| variant | images/s | s/image | predict s | loader wait s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['variant']} | {r['images_per_s']:.3f} | {r['s_per_image']:.2f} | {r['predict_s']:.1f} "
            f"| {r['data_wait_s']:.2f} |"
        )
    if res["slide_batched_over_loop"] is not None:
        lines += ["", f"slide batched / per-crop loop: {res['slide_batched_over_loop']:.2f}x"]
    lines.append(f"(text classifier once: {res['text_s']:.1f} s; model load {res['model_load_s']:.1f} s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 images after 1 warm-up image")
    p.add_argument("--images", type=int, default=8, help="timed images per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per variant")
    p.add_argument("--size", type=_size, default=(375, 500), help="image size HxW")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="model dtype")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (random init)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--pamr", action="store_true", help="PAMR on (off by default)")
    p.add_argument("--full-text", action="store_true", help="keep the model's full text tower (slow on CPU)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="bench/results", help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.warmup = 2, 1
    if args.images < 1 or args.warmup < 0:
        p.error("--images must be >= 1 and --warmup >= 0")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"eval_speed_{res['device'].split(':')[0]}{'_quick' if args.quick else ''}.json"
    write_text(out / name, json.dumps(res, indent=2) + "\n")
    print(markdown(res), end="")
    print(f"wrote {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
