"""End-to-end CPU benchmark: naclip vs an official-style computation, side by side in one run.

Model: random-init open_clip ``ViT-B-16`` (``pretrained=None``, no download), float32,
``torch.set_num_threads`` (default 2), 21 random unit query features (the image path is timed; text
encoding is not), no PAMR, ``prob_thd = 0``. Every (case, implementation) pair runs in a **fresh
subprocess**, so its peak RSS (``VmHWM``) is its own; the worker reports the process peak RSS (model
included; the same model in every worker) and the peak above the RSS right before the timed runs.

Implementations:

* ``naclip``: :meth:`naclip.Segmenter.predict_from_features` (the product path: NACLIP last block through
  :func:`naclip_kernels.gaussian_attention`, crops of an image batched through the model in ``slide`` mode).
* ``naclip_loop``: the same model with a 1-byte crop memory budget in ``slide`` mode, i.e. one crop per batch
  (a Python loop of batch-1 crops).
* ``official``: the official style of computation, written here: a Python loop of batch-1 crops through the
  ViT in LND layout with **every block's attention materialised** (``bmm(q, k^T)``, softmax, ``bmm(., v)`` per
  head, like ``nn.MultiheadAttention`` in torch 1.10), and for the last block NACLIP's
  ``softmax(scale K K^T + G) V`` with the **dense** ``[T, T]`` Gaussian addition ``G`` built by
  :func:`naclip_kernels.gaussian_bias` (closed form) and cached per grid, like the official ``addition_cache``
  (it is built during the warm-up run, so its one-off cost is not timed). Window placement, the
  positional-embedding rule and post-processing are the package's own (the same arithmetic as the official
  code; they are a small part of the time).

Cases (input = the model-resolution image; ``ori_shape`` = the same size):

=====================  =====================================================================================
``slide_336x448``      slide 224/112 (6 windows): naclip (batched) vs naclip_loop vs official
``whole_336x448``      whole image: naclip vs official
``single_1024``        single pass over 1024x1024 (4096 patches): naclip ``single`` vs official ``whole``
``single_2048``        single pass over 2048x2048 (16384 patches): naclip; official only with
                       ``--run-official-2048`` (under ``--mem-cap-gb``, default 22), otherwise its memory is
                       estimated and reported
=====================  =====================================================================================

Usage::

    python bench/e2e.py            # all cases -> bench/results/e2e_<host>_<time>.{csv,json,md}
    python bench/e2e.py --cases slide_336x448 whole_336x448 --repeats 3
    python bench/e2e.py --quick    # fewer repeats, no 2048 case (a smoke run)

Targets (issue 3): slide >= 1.2x faster than the per-crop loop; single 1024^2 >= 1.5x faster than official
whole with <= 1/3 of its peak RSS; single 2048^2 completes on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from bench._meta import machine_info, malloc_trim, reset_peak_rss, status_kb, write_text
except ModuleNotFoundError as _e:  # run as a script (python bench/e2e.py): bench/ itself is sys.path[0]
    if _e.name != "bench":
        raise
    from _meta import machine_info, malloc_trim, reset_peak_rss, status_kb, write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# case -> (height, width, mode for naclip, mode for official, warm-up runs, timed runs)
CASES: dict[str, dict] = {
    "slide_336x448": {"hw": (336, 448), "mode": "slide", "impls": ("naclip", "naclip_loop", "official")},
    "whole_336x448": {"hw": (336, 448), "mode": "whole", "impls": ("naclip", "official")},
    "single_1024": {"hw": (1024, 1024), "mode": "single", "impls": ("naclip", "official")},
    "single_2048": {"hw": (2048, 2048), "mode": "single", "impls": ("naclip", "official")},
}
# product cases: a uint8 photo of the given size through preprocessing (the mode's model-input size), the
# model and the full post-processing at the photo's size with PAMR on ("pipeline"); "pipeline_main" runs
# the same worker against the pre-tiling code in /work/main (untiled post-processing) for the per-pixel ratio
for _side in (336, 2048):
    for _mode in ("whole", "slide", "single"):
        CASES[f"photo{_side}_{_mode}"] = {"hw": (_side, _side), "mode": _mode, "impls": ("pipeline",)}
CASES["photo2048_whole"]["impls"] = ("pipeline", "pipeline_main")
CASES["photo1024_single"] = {"hw": (1024, 1024), "mode": "single", "impls": ("pipeline",)}
CASES["photo8000_whole"] = {"hw": (8000, 8000), "mode": "whole", "impls": ("pipeline",)}
DEFAULT_REPEATS = {"slide_336x448": 5, "whole_336x448": 5, "single_1024": 3, "single_2048": 1}
DEFAULT_REPEATS |= {c: 1 for c in CASES if c.startswith("photo")} | {"photo336_whole": 3, "photo336_slide": 3}
MAIN_TREE = Path(os.environ.get("NACLIP_BENCH_MAIN", "/work/main"))
NUM_QUERIES = 21
GAUSSIAN_STD = 5.0
GB = 1024**3


# ------------------------------------------------------------------------------------ official-style model


class OfficialStyle:
    """The official NACLIP computation on an open_clip ViT, materialising every attention matrix.

    LND layout like OpenAI CLIP; blocks 0..L-2: ``x + out_proj(MHA(ln_1(x)))``, ``x + mlp(ln_2(x))`` with the
    attention as ``softmax(bmm(q*scale, k^T)) @ v`` over ``[B*H, T, T]``; last block (``reduced``):
    ``out_proj(softmax(bmm(k, k^T) * scale + G) @ v)`` with the dense Gaussian ``G`` cached per grid.
    """

    def __init__(self, visual, gaussian_std: float = GAUSSIAN_STD):
        from naclip.model import NaclipVisual

        self.visual = visual
        self.std = gaussian_std
        self._pos = NaclipVisual(visual)  # only for the official (g + 0.1) / g bicubic pos-embed rule
        self.addition_cache: dict[tuple[int, int], object] = {}
        self.patch_size = self._pos.patch_size

    @staticmethod
    def _heads(t, T, B, H, d):  # [T, B, E] -> [B*H, T, d]
        return t.contiguous().view(T, B * H, d).transpose(0, 1)

    def _mha(self, attn, x):
        import torch
        import torch.nn.functional as F

        T, B, E = x.shape
        H = attn.num_heads
        d = E // H
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q = self._heads(q * d**-0.5, T, B, H, d)
        k, v = self._heads(k, T, B, H, d), self._heads(v, T, B, H, d)
        w = torch.bmm(q, k.transpose(1, 2))  # [B*H, T, T], materialised
        w = torch.softmax(w, dim=-1)
        out = torch.bmm(w, v).transpose(0, 1).contiguous().view(T, B, E)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def _custom_attn(self, attn, x, grid):
        import torch
        import torch.nn.functional as F

        import naclip_kernels

        T, B, E = x.shape
        H = attn.num_heads
        d = E // H
        _q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        k, v = self._heads(k, T, B, H, d), self._heads(v, T, B, H, d)
        if grid not in self.addition_cache:
            self.addition_cache[grid] = naclip_kernels.gaussian_bias(
                grid, self.std, dtype=x.dtype, device=x.device
            )
        w = torch.bmm(k, k.transpose(1, 2)) * d**-0.5
        w += self.addition_cache[grid]
        w = torch.softmax(w, dim=-1)
        out = torch.bmm(w, v).transpose(0, 1).contiguous().view(T, B, E)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def __call__(self, images):
        import torch

        v = self.visual
        x = v.conv1(images)  # [B, E, gh, gw]
        B, E, gh, gw = x.shape
        x = x.reshape(B, E, gh * gw).permute(0, 2, 1)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(B, 1, E), x], dim=1)
        x = x + self._pos.interpolate_pos_embed(gh, gw).reshape(1, -1, E).to(x.dtype)
        x = v.ln_pre(x).permute(1, 0, 2)  # LND
        blocks = v.transformer.resblocks
        for blk in blocks[:-1]:
            x = x + self._mha(blk.attn, blk.ln_1(x))
            x = x + blk.mlp(blk.ln_2(x))
        x = self._custom_attn(blocks[-1].attn, blocks[-1].ln_1(x), (gh, gw))
        x = x.permute(1, 0, 2)
        return v.ln_post(x) @ v.proj


def _official_predict(model: OfficialStyle, image, text, qidx, mode: str):
    """Official pipeline without PAMR: per-crop loop (slide) or one forward (whole), then post-processing."""
    import torch

    from naclip.inference import dense_logits, postprocess, slide_windows

    _, _, H, W = image.shape
    if mode == "slide":
        acc = torch.zeros((1, text.shape[0], H, W))
        count = torch.zeros((1, 1, H, W))
        for w in slide_windows(H, W, 224, 112):  # batch-1 crops, one at a time
            acc[:, :, w.y1 : w.y2, w.x1 : w.x2] += dense_logits(
                model, image[:, :, w.y1 : w.y2, w.x1 : w.x2], text
            )
            count[:, :, w.y1 : w.y2, w.x1 : w.x2] += 1
        logits = acc / count
    else:
        logits = dense_logits(model, image, text).float()
    return postprocess(logits, image, qidx, ori_shape=(H, W), pamr_steps=0, prob_thd=0.0)


# ------------------------------------------------------------------------------------------------- worker


def _pipeline_run(visual, spec: dict, text, qidx, seed: int):
    """``run()`` for a product case: uint8 photo -> preprocessing -> model -> post-processing with PAMR at
    the photo's size (probabilities not kept when they exceed the memory budget, as in ``predict``)."""
    import numpy as np
    import torch

    from naclip import inference
    from naclip.segmenter import Segmenter

    H, W = spec["hw"]
    # a smooth random photo (upsampled noise), so PAMR sees structure rather than white noise
    small = torch.rand(1, 3, max(H // 64, 4), max(W // 64, 4), generator=torch.Generator().manual_seed(seed))
    photo = torch.nn.functional.interpolate(small * 255, size=(H, W), mode="bilinear")
    rgb = photo[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    del small, photo
    seg = Segmenter(visual, None, method="naclip", device="cpu", dtype=torch.float32)
    mode = spec["mode"]
    if hasattr(inference, "model_input_size"):
        size = inference.model_input_size(
            H, W, mode=mode, patch_size=(16, 16), short_side=None if mode == "single" else 336, long_side=None
        )
        prep = {"size": size}
    else:  # the pre-tiling code (pipeline_main): single was whole
        prep = {"short_side": 336, "long_side": 2048}
        mode = "whole" if mode == "single" else mode

    def run():
        x = inference.preprocess(np.asarray(rgb), **prep)
        return seg.predict_from_features(x, text, qidx, ori_shape=(H, W), mode=mode, pamr_steps=10)

    nh, nw = prep.get("size") or inference.rescale_size(H, W, 336, 2048)
    run.tokens = 1 + (nh // 16) * (nw // 16)  # type: ignore[attr-defined]
    return run


def _worker(
    case: str,
    impl: str,
    repeats: int,
    warmup: int,
    threads: int,
    seed: int,
    mem_cap_gb: float = 0.0,
    labels_out: str | None = None,
) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    import open_clip

    from naclip.segmenter import SegmentConfig, Segmenter

    # only the image tower is kept (the text path is not timed): the process RSS is then the ViT's weights,
    # the torch runtime and what the forward itself allocates
    visual = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval()
    gc.collect()
    malloc_trim()
    if mem_cap_gb:
        # address-space budget on top of what is mapped now (the CUDA build of torch maps GBs of virtual
        # memory at import), so an allocation beyond it fails with a clean error instead of swapping
        limit = status_kb("VmSize") * 1024 + int(mem_cap_gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    spec = CASES[case]
    H, W = spec["hw"]
    image = torch.randn(1, 3, H, W)
    text = torch.nn.functional.normalize(torch.randn(NUM_QUERIES, visual.output_dim), dim=-1)
    qidx = torch.arange(NUM_QUERIES)

    if impl in ("pipeline", "pipeline_main"):
        run = _pipeline_run(visual, spec, text, qidx, seed)
    elif impl == "official":
        model = OfficialStyle(visual)
        mode = "slide" if spec["mode"] == "slide" else "whole"

        def run():
            return _official_predict(model, image, text, qidx, mode)
    else:
        # naclip_loop: a 1-byte memory budget makes every crop its own batch (the per-crop loop)
        config = SegmentConfig(memory_budget=1) if impl == "naclip_loop" else SegmentConfig()
        seg = Segmenter(visual, None, method="naclip", device="cpu", dtype=torch.float32, config=config)

        def run():
            return seg.predict_from_features(
                image, text, qidx, ori_shape=(H, W), mode=spec["mode"], pamr_steps=0, prob_thd=0.0
            )

    times = []
    base_kb = status_kb("VmRSS")
    reset_ok = reset_peak_rss()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                run()
            gc.collect()
            malloc_trim()
            base_kb = status_kb("VmRSS")
            reset_ok = reset_peak_rss()
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = run()
                times.append(time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as exc:
        if "alloc" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        return {
            "case": case,
            "impl": impl,
            "status": f"out of memory (allocation budget {mem_cap_gb:g} GB above the loaded model)",
            "peak_rss_gb": status_kb("VmHWM") * 1024 / GB,
        }
    peak_kb = status_kb("VmHWM")
    labels = res[0] if isinstance(res, tuple) else res.labels
    labels = labels if labels.numel() <= 2**24 else labels[:4096, :4096]  # large maps: the top-left corner
    if labels_out:
        import numpy as np

        np.save(labels_out, labels.numpy().astype(np.int16))
    return {
        "case": case,
        "impl": impl,
        "mode": spec["mode"] if impl != "official" else ("slide" if spec["mode"] == "slide" else "whole"),
        "height": H,
        "width": W,
        "tokens": getattr(run, "tokens", 1 + (H // 16) * (W // 16)),
        "repeats": repeats,
        "warmup": warmup,
        "time_median_s": statistics.median(times),
        "time_min_s": min(times),
        "times_s": times,
        "peak_rss_gb": peak_kb * 1024 / GB,
        "rss_before_gb": base_kb * 1024 / GB,
        "peak_above_base_gb": (peak_kb - base_kb) * 1024 / GB,
        "peak_reset": reset_ok,
        "labels_shape": list(labels.shape),
        "status": "ok",
    }


# ------------------------------------------------------------------------------------------- orchestrator


def _official_attention_bytes(h: int, w: int, width: int = 768, heads: int = 12) -> int:
    """Bytes of one materialised fp32 attention step: scores + softmax ``[H, T, T]`` + the ``[T, T]`` bias."""
    t = 1 + (h // 16) * (w // 16)
    return 4 * (2 * heads * t * t + t * t)


def _run_worker(case: str, impl: str, args, labels_dir: Path) -> dict:
    repeats = args.repeats or DEFAULT_REPEATS[case]
    warmup = 0 if case == "single_2048" or (case.startswith("photo") and "336" not in case) else 1
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, impl, "--repeats", str(repeats)]
    cmd += ["--warmup", str(warmup), "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--labels-out", str(labels_dir / f"{case}_{impl}.npy")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if impl == "pipeline_main":  # the same worker against the pre-tiling package
        env["PYTHONPATH"] = str(MAIN_TREE)
        cmd[1] = str(Path(__file__).resolve())
    cap = args.mem_cap_gb
    if impl == "official" and case == "single_2048" and not cap:
        cap = 22.0  # the dense path must fail cleanly instead of swapping the machine
    if cap:
        cmd += ["--mem-cap-gb", str(cap)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode == 0:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        err = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        row = {"case": case, "impl": impl, "status": f"failed (exit {proc.returncode}): {err[:300]}"}
    row["process_wall_s"] = wall
    return row


def _label_agreement(rows: list[dict], labels_dir: Path) -> None:
    """Fraction of pixels whose label equals the ``official`` run's (same seed: same weights and image)."""
    import numpy as np

    for r in rows:
        if r.get("status") != "ok":
            continue
        ref_path = labels_dir / f"{r['case']}_official.npy"
        if not ref_path.is_file():  # product cases: against the pre-tiling (untiled) code
            ref_path = labels_dir / f"{r['case']}_pipeline_main.npy"
        mine = labels_dir / f"{r['case']}_{r['impl']}.npy"
        if ref_path.is_file() and mine.is_file():
            r["labels_agree_with_official"] = float((np.load(ref_path) == np.load(mine)).mean())


def _speedups(rows: list[dict]) -> list[dict]:
    """Per case: naclip vs each other impl (time and peak-RSS ratios)."""
    out = []
    by = {(r["case"], r["impl"]): r for r in rows if r.get("status") == "ok"}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = by.get((case, "naclip")) or by.get((case, "pipeline"))
        if ours is None:
            continue
        for impl in ("naclip_loop", "official", "pipeline_main"):
            other = by.get((case, impl))
            if other is None:
                continue
            out.append(
                {
                    "case": case,
                    "vs": impl,
                    "speedup": other["time_median_s"] / ours["time_median_s"],
                    "peak_rss_ratio": ours["peak_rss_gb"] / other["peak_rss_gb"],
                    "peak_above_base_ratio": ours["peak_above_base_gb"]
                    / max(other["peak_above_base_gb"], 1e-9),
                }
            )
    return out


def _markdown(rows: list[dict], speed: list[dict], machine: dict, threads: int) -> str:
    m = machine
    dirty = " dirty" if m["git_dirty"] else ""
    load = m["loadavg_at_start"][0] if m["loadavg_at_start"] else float("nan")
    lines = [
        f"End-to-end, random-init ViT-B-16, fp32, {threads} threads, {NUM_QUERIES} queries, "
        "PAMR off except in the photo* product cases (10 steps) "
        f"({m['cpu_model']}, {m['cpu_count']} CPUs, {m['mem_total_gb']} GB; torch {m['versions']['torch']}, "
        f"open_clip {m['versions']['open_clip']}; git {(m['git_sha'] or 'unknown')[:10]}{dirty}; "
        f"load avg {load:.1f})",
        "",
        "| case | impl | mode | tokens | time median (s) | time min (s) | peak RSS (GB) "
        "| peak above base (GB) | labels = official |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            note = f": {r['note']}" if r.get("note") else ""
            lines.append(f"| {r['case']} | {r['impl']} | | | {r['status']}{note} | | | | |")
            continue
        agree = r.get("labels_agree_with_official")
        agree = "" if agree is None else f"{100 * agree:.2f} %"
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['mode']} | {r['tokens']} | {r['time_median_s']:.3f} | "
            f"{r['time_min_s']:.3f} | {r['peak_rss_gb']:.2f} | {r['peak_above_base_gb']:.2f} | {agree} |"
        )
    if speed:
        lines += [
            "",
            "| case | naclip vs | speed-up (x) | peak RSS ratio | peak-above-base ratio |",
            "|---|---|---|---|---|",
        ]
        for s in speed:
            lines.append(
                f"| {s['case']} | {s['vs']} | {s['speedup']:.2f} | {s['peak_rss_ratio']:.2f} | "
                f"{s['peak_above_base_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=None, help="cases to run (default: all)"
    )
    p.add_argument(
        "--impls", nargs="+", choices=["naclip", "naclip_loop", "official", "pipeline", "pipeline_main"]
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: per-case)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 repeats, no 2048 case")
    p.add_argument(
        "--run-official-2048",
        action="store_true",
        help="run the dense 2048^2 path (under --mem-cap-gb, default 22)",
    )
    p.add_argument(
        "--mem-cap-gb",
        type=float,
        default=0.0,
        help="per-worker allocation budget in GB beyond the loaded model (0 = none); a case that needs more "
        "is reported as out of memory",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--tag", default=None, help="file-name tag (default: <host>_<UTC time>)")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--labels-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        case, impl = args.worker
        row = _worker(
            case,
            impl,
            args.repeats or 1,
            args.warmup,
            args.threads,
            args.seed,
            args.mem_cap_gb,
            args.labels_out,
        )
        print(json.dumps(row))
        return 0

    cases = args.cases or [c for c in CASES if not (args.quick and c == "single_2048")]
    if args.quick and args.repeats is None:
        args.repeats = 2
    machine = machine_info("cpu", threads=args.threads)
    rows: list[dict] = []
    labels_dir = Path(tempfile.mkdtemp(prefix="naclip_e2e_"))
    for case in cases:
        for impl in CASES[case]["impls"]:
            if args.impls and impl not in args.impls:
                continue
            if case == "single_2048" and impl == "official" and not args.run_official_2048:
                need = _official_attention_bytes(*CASES[case]["hw"])
                rows.append(
                    {
                        "case": case,
                        "impl": impl,
                        "status": "not run",
                        "note": f"dense attention needs >= {need / GB:.1f} GB (scores + softmax "
                        "[12, T, T] fp32 + [T, T] bias, T = 16385)",
                        "estimated_attention_gb": need / GB,
                    }
                )
                print(f"{case:15s} {impl:12s} not run (needs >= {need / GB:.1f} GB)", flush=True)
                continue
            row = _run_worker(case, impl, args, labels_dir)
            rows.append(row)
            if row.get("status") == "ok":
                print(
                    f"{case:15s} {impl:12s} {row['time_median_s']:8.3f} s  "
                    f"peak RSS {row['peak_rss_gb']:.2f} GB (+{row['peak_above_base_gb']:.2f} GB)",
                    flush=True,
                )
            else:
                print(f"{case:15s} {impl:12s} {row['status']}", flush=True)
    _label_agreement(rows, labels_dir)
    shutil.rmtree(labels_dir, ignore_errors=True)
    speed = _speedups(rows)
    md = _markdown(rows, speed, machine, args.threads)
    print()
    print(md)

    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{machine['host']}_{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    stem = args.out / f"e2e_{tag}"
    fields = [
        "case", "impl", "mode", "height", "width", "tokens", "repeats", "warmup", "time_median_s",
        "time_min_s", "peak_rss_gb", "rss_before_gb", "peak_above_base_gb", "labels_agree_with_official",
        "process_wall_s", "status", "note",
    ]  # fmt: skip
    write_text(stem.with_suffix(".csv"), _csv_text(rows, fields))
    payload = {
        "machine": machine,
        "threads": args.threads,
        "num_queries": NUM_QUERIES,
        "rows": rows,
        "speedups": speed,
    }
    write_text(stem.with_suffix(".json"), json.dumps(payload, indent=1))
    write_text(stem.with_suffix(".md"), md)
    print(f"wrote {stem}.csv/.json/.md")
    return 0 if all(r.get("status") in ("ok", "not run") for r in rows) else 1


def _csv_text(rows, fields) -> str:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
