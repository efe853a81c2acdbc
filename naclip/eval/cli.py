"""``naclip eval`` / ``naclip score`` (registered by :mod:`naclip.cli`) and ``python -m naclip.eval``
(torchrun).

``naclip eval --dataset voc21 --root PATH [--paper] [--model ViT-B-16 --pretrained openai | --checkpoint F]
[--mode whole|slide|single] [--pamr/--no-pamr] [--limit N] [--out DIR] [--device D] [--dtype fp32|fp16|bf16]``
evaluates NACLIP on a benchmark split and writes ``results.json``, ``results.md`` and ``confusion.npy`` into
``--out`` (default ``naclip_eval/<dataset>``). Settings not given come from the dataset's preset
(:mod:`naclip.presets`: classes, ``prob_thd``, resize, mode, PAMR). ``--paper`` pins every setting to the
paper's (OpenAI ViT-B/16, ``naclip`` attention, the preset, slide 224/112, PAMR 10 it. (8, 16), fp16 on CUDA
unless ``--dtype``) and refuses flags that would change them, except ``--no-pamr``, which selects the paper's
"no post-processing" row; the reported mIoU is printed beside ours. ``--method M`` (``clearclip``, ``sclip``,
``resclip``, ``scclip``) evaluates another method with its official per-dataset settings
(:func:`naclip.methods.method_preset`); with ``--paper`` its reported number (``n/r`` when absent) is printed.

A run killed at any moment resumes when started again with the same ``--out`` (progress in
``--out/progress``); ``torchrun --nproc_per_node K -m naclip.eval ...`` splits the images over K ranks (NCCL
on CUDA, gloo on CPU).

``naclip score --dataset voc21 --root PATH --pred DIR [--out DIR]`` scores predicted label PNGs
(``<image stem>.png`` or ``<image stem>_mask.png`` as written by ``naclip segment``; values = class ids of the
dataset) with the same metrics and outputs.

User errors print one ``error:`` line and return exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from naclip.cli import (
    add_inference_arguments,
    add_model_arguments,
    add_text_args,
    non_negative_int,
    positive_int,
    text_progress,
)
from naclip.segmenter import dtype_name, resolve_dtype

__all__ = ["add_eval_parser", "add_score_parser", "main", "run_eval", "run_score"]

EXIT_OK, EXIT_USAGE = 0, 2

#: The paper's fixed settings (spec §3); per-dataset ones come from the preset.
PAPER_SETTINGS = {
    "model": "ViT-B-16",
    "pretrained": "openai",
    "method": "naclip",
    "crop": 224,
    "stride": 112,
    "gaussian_std": 5.0,
}


EVAL_DESCRIPTION = (
    "Evaluate NACLIP on a benchmark split with mmseg's IoU protocol and write results.json, results.md and "
    "confusion.npy into --out. Unset settings come from the dataset's preset; --paper pins the paper's "
    "settings (OpenAI ViT-B/16, fp16 on CUDA) and prints its mIoU beside ours. Rerunning with the same --out "
    "resumes."
)


class EvalUserError(Exception):
    """Bad invocation or data (printed as one ``error:`` line, exit status 2)."""


def _add_common(p: argparse.ArgumentParser) -> None:
    from naclip.eval.datasets import DATASETS

    p.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help=f"benchmark: {', '.join(DATASETS)} (aliases: pc59, city, ...)",
    )
    p.add_argument(
        "--root", required=True, metavar="PATH", help="dataset root (the mmseg layout, see the docs)"
    )
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument("--out", metavar="DIR", help="output folder (default: naclip_eval/<dataset>[_score])")
    p.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images of the split")
    p.add_argument(
        "--workers", type=non_negative_int, default=2, metavar="N", help="DataLoader worker processes"
    )
    prog = p.add_mutually_exclusive_group()
    prog.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="show a progress bar"
    )
    prog.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument(
        "--paper", action="store_true", help="the paper's exact settings; print its mIoU beside ours"
    )
    add_model_arguments(p)
    add_inference_arguments(p)
    p.add_argument("--seed", type=non_negative_int, default=0, help="torch seed before building the model")
    p.add_argument(
        "--save-pred",
        metavar="DIR",
        help="also write each predicted label map as DIR/<image stem>.png (class ids; for naclip score)",
    )
    add_text_args(p)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``argparse`` sub-parsers object (sets ``func`` to :func:`run_eval`)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate on a benchmark (mIoU, mmseg protocol)",
        description=EVAL_DESCRIPTION,
    )
    _add_eval_args(p)
    p.set_defaults(func=run_eval)
    return p


def add_score_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``score`` on an ``argparse`` sub-parsers object (sets ``func`` to :func:`run_score`)."""
    p = subparsers.add_parser(
        "score",
        help="score predicted label PNGs on a benchmark",
        description="Score predicted label PNGs (<image stem>.png or <image stem>_mask.png, values = class "
        "ids) with the mmseg IoU protocol; writes results.json / results.md / confusion.npy.",
    )
    _add_common(p)
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label PNGs")
    p.set_defaults(func=run_score)
    return p


# ----------------------------------------------------------------------------------------------- helpers


def _dist_setup(device_arg: str | None) -> tuple[int, int, str]:
    """Initialise torch.distributed under torchrun (WORLD_SIZE > 1); returns (rank, world, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):  # one GPU per rank: the local rank's, whatever index --device named
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _dist_teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for errors re-raised from a DataLoader worker, the original error's last
    line."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        msg = lines[-1].split(": ", 1)[-1] if lines else msg
    return msg


def _progress_default(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _ids_digest(dataset) -> str:
    h = hashlib.sha256()
    for s in dataset.samples:
        h.update(s.id.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def _open_dataset(args, pred_dir=None):
    from naclip.eval.datasets import EvalDataset

    try:
        return EvalDataset(args.dataset, args.root, split=args.split, pred_dir=pred_dir)
    except (OSError, ValueError, TypeError) as e:
        raise EvalUserError(str(e)) from None


def resolve_settings(args, preset) -> dict:
    """Effective settings (explicit flags > paper / the method's preset > library defaults); EvalUserError on
    conflicts."""
    from naclip.methods import method_preset

    method = args.method or PAPER_SETTINGS["method"]
    preset = method_preset(method, preset)  # the method's official per-dataset settings
    crop = preset.crop or PAPER_SETTINGS["crop"]
    stride = preset.stride or PAPER_SETTINGS["stride"]
    pamr = preset.pamr if args.pamr is None else args.pamr
    s = {
        "model": args.model or PAPER_SETTINGS["model"],
        "pretrained": args.pretrained or PAPER_SETTINGS["pretrained"],
        "checkpoint": args.checkpoint,
        "method": method,
        "mode": args.mode or preset.mode,
        "pamr": bool(pamr),
        "prob_thd": preset.prob_thd if args.prob_thd is None else args.prob_thd,
        "short_side": args.short_side or preset.short_side,
        "crop": args.crop or crop,
        "stride": args.stride or stride,
        "gaussian_std": PAPER_SETTINGS["gaussian_std"] if args.gaussian_std is None else args.gaussian_std,
        "preset": preset.name,
    }
    if args.templates is not None:  # only then: the fingerprint of a default run stays as it was
        s["templates"] = _templates_setting(args.templates)
    if args.paper:
        fixed = {
            "--model": (args.model, PAPER_SETTINGS["model"]),
            "--pretrained": (args.pretrained, PAPER_SETTINGS["pretrained"]),
            "--mode": (args.mode, preset.mode),
            "--prob-thd": (args.prob_thd, preset.prob_thd),
            "--short-side": (args.short_side, preset.short_side),
            "--crop": (args.crop, crop),
            "--stride": (args.stride, stride),
            "--gaussian-std": (args.gaussian_std, PAPER_SETTINGS["gaussian_std"]),
            "--model-config": (args.model_config, None),
            "--templates": (args.templates, None),
        }
        bad = [
            f"{k} {v!r} (paper: {want!r})" for k, (v, want) in fixed.items() if v is not None and v != want
        ]
        if bad:
            raise EvalUserError(f"--paper fixes these settings; drop them or drop --paper: {'; '.join(bad)}")
    return s


def _templates_setting(value: str) -> str:
    """``--templates`` as a fingerprint value: the set name, or the file name and its content's SHA-256."""
    from naclip.text import TEMPLATE_SETS

    if value in TEMPLATE_SETS:
        return value
    try:
        digest = hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise EvalUserError(f"--templates: cannot read {value!r}: {e}") from None
    return f"{value} (sha256 {digest})"


def _build_predictor(settings: dict, args, device: str):
    """(predict(image) -> labels, segmenter) for the settings; model errors become EvalUserError."""
    import torch

    from naclip.segmenter import SegmentConfig, Segmenter
    from naclip.text import load_templates

    if args.model_config:
        cfg = Path(args.model_config)
        if not cfg.is_file():
            raise EvalUserError(f"--model-config {args.model_config!r} does not exist")
        import open_clip

        open_clip.add_model_config(cfg)
    ckpt = settings["checkpoint"]
    if ckpt is not None and not Path(ckpt).is_file():
        raise EvalUserError(f"--checkpoint {ckpt!r} does not exist")
    pretrained = None if str(settings["pretrained"]).lower() in ("none", "") else settings["pretrained"]
    try:
        templates = load_templates(args.templates) if args.templates is not None else None
    except ValueError as e:
        raise EvalUserError(f"--templates: {e}") from None
    torch.manual_seed(args.seed)
    try:
        seg = Segmenter.from_pretrained(
            settings["model"],
            pretrained,
            device=device,
            dtype=resolve_dtype(args.dtype),
            method=settings["method"],
            checkpoint=ckpt,
            backend=args.backend,  # None = the library default ($NACLIP_ATTN_BACKEND, else "auto")
            gaussian_std=settings["gaussian_std"],
            config=SegmentConfig(templates=templates) if templates else None,
            text_cache=False if args.no_text_cache else None,
        )
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        # RuntimeError covers naclip.hub.WeightsUnavailableError (offline, no local checkpoint).
        raise EvalUserError(str(e)) from None
    return make_segmenter_predictor(seg, settings), seg


def make_segmenter_predictor(seg, settings: dict):
    """``predict(image uint8 [H, W, 3]) -> labels [H, W]`` calling ``seg.predict`` with the preset's classes
    and the given settings (keys ``preset``, ``mode``, ``pamr``, ``prob_thd``, ``short_side``, ``crop``,
    ``stride``)."""
    kw = {k: settings[k] for k in ("preset", "mode", "pamr", "prob_thd", "short_side", "crop", "stride")}

    def predict(image):
        return seg.predict(image, None, **kw).labels

    return predict


def _label_png_writer(pred_dir: str | None, dataset=None):
    """``on_prediction`` callback writing ``<stem>.png`` (uint8 class ids, greyscale) atomically
    (:func:`naclip.io.atomic_write`), or None. With ``dataset``, the image's own image and label files are
    protected (ValueError instead of overwriting an input)."""
    if pred_dir is None:
        return None
    import numpy as np
    from PIL import Image

    from naclip.io import atomic_write

    out = Path(pred_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(item: dict, labels) -> None:
        arr = labels.cpu().numpy()
        if arr.size and int(arr.max()) > 255:
            raise ValueError(f"--save-pred: label {int(arr.max())} does not fit an 8-bit PNG")
        protect = ()
        if dataset is not None:
            sample = dataset.samples[item["index"]]
            protect = (sample.image_path, sample.label_path)
        im = Image.fromarray(arr.astype(np.uint8))
        atomic_write(out / f"{item['stem']}.png", lambda f: im.save(f, format="PNG"), protect=protect)

    return write


def _fingerprint(dataset, settings: dict, extra: dict) -> dict:
    fp = {
        "dataset": dataset.name,
        "split": dataset.split,
        "num_images": len(dataset),
        "ids_sha256_16": _ids_digest(dataset),
        "num_classes": dataset.num_classes,
    }
    fp.update({f"setting.{k}": v for k, v in settings.items()})
    fp.update(extra)
    return fp


def _finish(
    args, dataset, outcome, *, config: dict, paper: dict | None, device: str | None, world: int, timing: dict
) -> dict:
    from naclip.eval.report import build_results, environment_info, markdown_table, write_outputs
    from naclip.presets import get_preset

    names = list(get_preset(dataset.name).class_names)
    run = {
        "resumed_images": outcome.resumed,
        "processed_images": outcome.processed,
        "world_size": world,
        "torn_bytes_discarded": outcome.torn_bytes,
        "limit": args.limit,
    }
    results = build_results(
        dataset=dataset.name,
        title=dataset.spec.title,
        split=dataset.split,
        root=str(dataset.root),
        class_names=names,
        metrics=outcome.metrics,
        num_images=len(outcome.indices),
        config=config,
        run=run,
        timing=timing,
        paper=paper,
        env=environment_info(device),
    )
    paths = write_outputs(args.out, results, outcome.hist)
    print(markdown_table(results), end="")
    m = outcome.metrics
    if m.out_of_range_label_pixels:
        vals = ", ".join(f"{v}: {n} px" for v, n in sorted(m.out_of_range_label_pixels.items())[:10])
        print(
            f"warning: {sum(m.out_of_range_label_pixels.values())} labelled pixels have values outside "
            f"0..{m.num_classes - 1} (and are not 255): {vals}. They are not ground truth of any class, but "
            f"predictions on them count in the predicted areas (as in mmseg). Check --dataset / --root.",
            file=sys.stderr,
        )
    if m.out_of_range_pred_pixels:
        print(
            f"warning: {m.out_of_range_pred_pixels} predicted pixels have values >= {m.num_classes} "
            f"(count as misses of their ground-truth class)",
            file=sys.stderr,
        )
    print(f"wrote {paths['json']}, {paths['md']}, {paths['confusion']}", file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------- commands


def run_eval(args) -> int:
    """``naclip eval`` on parsed ``args`` (see :func:`add_eval_parser`); returns the exit status."""
    try:
        return _run_eval(args)
    except EvalUserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        _dist_teardown()


def _run_eval(args) -> int:
    from naclip.eval.datasets import canonical_dataset_name
    from naclip.eval.paper import paper_miou
    from naclip.eval.runner import evaluate, select_indices
    from naclip.presets import get_preset
    from naclip_kernels import get_default_backend

    try:
        name = canonical_dataset_name(args.dataset)
    except ValueError as e:
        raise EvalUserError(f"--dataset: {e}") from None
    preset = get_preset(name)
    settings = resolve_settings(args, preset)
    args.out = args.out or os.path.join("naclip_eval", name)
    rank, world, device = _dist_setup(args.device)
    dataset = _open_dataset(args)
    if args.paper and args.dtype is None and device.startswith("cuda"):
        args.dtype = "fp16"  # the official numbers come from an fp16 pipeline on GPU (spec §7.8)
    t0 = time.perf_counter()
    predictor, seg = _build_predictor(settings, args, device)
    t_load = time.perf_counter() - t0
    dtype = dtype_name(seg.dtype)
    extra = {"dtype": dtype, "device_type": device.split(":")[0]}
    if settings["pretrained"] in (None, "none", ""):
        extra["seed"] = args.seed
    fp = _fingerprint(dataset, settings, extra)
    progress = _progress_default(args.progress)
    t0 = time.perf_counter()
    with text_progress(disable=not progress or rank != 0) as text_bar:  # before the image bar starts
        seg.text_features(preset.classes, progress=text_bar)
    t_text = time.perf_counter() - t0
    if rank == 0:
        print(
            f"naclip eval: {dataset.spec.title}, {len(dataset)} images in {dataset.root}; "
            f"settings {settings}; out {args.out}" + (f"; {world} ranks" if world > 1 else ""),
            file=sys.stderr,
        )
    try:
        outcome = evaluate(
            dataset,
            predictor,
            indices=select_indices(len(dataset), args.limit),
            log_dir=Path(args.out) / "progress",
            fingerprint=fp,
            num_workers=args.workers,
            progress=progress,
            progress_desc=f"eval {name}",
            on_prediction=_label_png_writer(args.save_pred, dataset),
        )
    except (OSError, ValueError) as e:
        raise EvalUserError(str(e)) from None
    if rank != 0:
        return EXIT_OK
    paper = None
    if args.paper:
        value, source = paper_miou(name, settings["pamr"], settings["method"])
        paper = {"mIoU": value, "source": source}
    timing = dict(outcome.timing, model_load_s=t_load, text_features_s=t_text)
    config = dict(
        settings, paper=bool(args.paper), dtype=dtype, device=device, seed=args.seed, workers=args.workers
    )
    config["backend"] = args.backend if args.backend is not None else get_default_backend()
    _finish(args, dataset, outcome, config=config, paper=paper, device=device, world=world, timing=timing)
    return EXIT_OK


def run_score(args) -> int:
    """``naclip score`` on parsed ``args`` (see :func:`add_score_parser`); returns the exit status."""
    try:
        return _run_score(args)
    except EvalUserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _run_score(args) -> int:
    from naclip.eval.datasets import canonical_dataset_name
    from naclip.eval.runner import evaluate, select_indices

    try:
        name = canonical_dataset_name(args.dataset)
    except ValueError as e:
        raise EvalUserError(f"--dataset: {e}") from None
    args.out = args.out or os.path.join("naclip_eval", f"{name}_score")
    dataset = _open_dataset(args, pred_dir=args.pred)
    try:
        outcome = evaluate(
            dataset,
            None,
            indices=select_indices(len(dataset), args.limit),
            num_workers=args.workers,
            progress=_progress_default(args.progress),
            progress_desc=f"score {name}",
        )
    except (OSError, ValueError) as e:
        raise EvalUserError(str(e)) from None
    config = {"pred": str(Path(args.pred).resolve()), "workers": args.workers}
    _finish(args, dataset, outcome, config=config, paper=None, device=None, world=1, timing=outcome.timing)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser of ``python -m naclip.eval`` (the ``naclip eval`` arguments)."""
    p = argparse.ArgumentParser(prog="python -m naclip.eval", description=EVAL_DESCRIPTION)
    _add_eval_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m naclip.eval [naclip eval arguments]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_eval(args)
