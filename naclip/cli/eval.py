"""``naclip eval --dataset NAME --root PATH [--paper] [model and inference options] [--out DIR]`` and
``python -m naclip.eval`` (the same arguments; the entry point of ``torchrun -m naclip.eval``).

Evaluates a method on a benchmark split and writes ``results.json``, ``results.md`` and ``confusion.npy``
into ``--out`` (default ``naclip_eval/<dataset>``). Unset settings come from the dataset's preset, through
the method's official per-dataset settings (:func:`naclip.methods.method_preset`); ``--paper`` pins the
paper's settings (:data:`PAPER_SETTINGS`, fp16 on CUDA unless ``--dtype``), refuses flags that would change
them except ``--no-pamr`` (the paper's "no post-processing" row) and prints the reported mIoU beside ours.
A killed run resumes with the same ``--out``; under torchrun the images are split over the ranks (NCCL on
CUDA, gloo on CPU). User errors print one ``error:`` line and return exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from naclip import distributed
from naclip.cli._args import (
    EXIT_OK,
    UserError,
    add_inference_arguments,
    add_model_arguments,
    add_text_args,
    non_negative_int,
    templates_arg,
    text_progress,
)
from naclip.cli._benchmark import (
    add_dataset_arguments,
    canonical_name,
    finish,
    open_dataset,
    progress_default,
    run_evaluation,
    run_reporting_errors,
)
from naclip.cli._loader import load_segmenter, register_model_config
from naclip.segmenter import dtype_name, resolve_dtype

#: The paper's fixed model and method (spec §3); its crop / stride / Gaussian std are the library defaults
#: (:class:`naclip.config.SegmentConfig`), per-dataset settings come from the preset.
PAPER_SETTINGS = {"model": "ViT-B-16", "pretrained": "openai", "method": "naclip"}

EVAL_DESCRIPTION = (
    "Evaluate NACLIP on a benchmark split with mmseg's IoU protocol and write results.json, results.md and "
    "confusion.npy into --out. Unset settings come from the dataset's preset; --paper pins the paper's "
    "settings (OpenAI ViT-B/16, fp16 on CUDA) and prints its mIoU beside ours. Rerunning with the same --out "
    "resumes."
)


# ------------------------------------------------------------------------------------------------ parser


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    add_dataset_arguments(p)
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse sub-parsers object (``func`` = :func:`run`)."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate on a benchmark (mIoU, mmseg protocol)",
        description=EVAL_DESCRIPTION,
    )
    _add_eval_args(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser of ``python -m naclip.eval`` (the ``naclip eval`` arguments)."""
    p = argparse.ArgumentParser(prog="python -m naclip.eval", description=EVAL_DESCRIPTION)
    _add_eval_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m naclip.eval [naclip eval arguments]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run(args)


# ---------------------------------------------------------------------------------------------- settings


def resolve_settings(args, preset) -> dict:
    """Effective settings (explicit flags > paper / the method's preset > library defaults), merged by
    :meth:`naclip.config.SegmentConfig.resolve`; ``UserError`` on conflicts with ``--paper`` or bad values."""
    from naclip.config import SegmentConfig
    from naclip.methods import method_preset

    method = args.method or PAPER_SETTINGS["method"]
    preset = method_preset(method, preset)  # the method's official per-dataset settings
    base = SegmentConfig().resolve(preset)  # what --paper pins
    flags = {"mode": args.mode, "pamr": args.pamr, "prob_thd": args.prob_thd, "short_side": args.short_side}
    flags.update(crop=args.crop, stride=args.stride, gaussian_std=args.gaussian_std)
    try:
        cfg = base.resolve(**flags)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    s = {
        "model": args.model or PAPER_SETTINGS["model"],
        "pretrained": args.pretrained or PAPER_SETTINGS["pretrained"],
        "checkpoint": args.checkpoint,
        "method": method,
        **{k: getattr(cfg, k) for k in ("mode", "pamr", "prob_thd", "short_side", "crop", "stride")},
        "gaussian_std": cfg.gaussian_std,
        "preset": preset.name,
    }
    if args.templates is not None:  # only then: the fingerprint of a default run stays as it was
        s["templates"] = _templates_setting(args.templates)
    if args.paper:
        _check_paper(args, base)
    return s


def _check_paper(args, paper) -> None:
    """``UserError`` listing the flags that ``--paper`` fixes (``paper``: the preset's
    :class:`~naclip.config.SegmentConfig`) and that were given another value."""
    fixed = {
        "--model": (args.model, PAPER_SETTINGS["model"]),
        "--pretrained": (args.pretrained, PAPER_SETTINGS["pretrained"]),
        "--mode": (args.mode, paper.mode),
        "--prob-thd": (args.prob_thd, paper.prob_thd),
        "--short-side": (args.short_side, paper.short_side),
        "--crop": (args.crop, paper.crop),
        "--stride": (args.stride, paper.stride),
        "--gaussian-std": (args.gaussian_std, paper.gaussian_std),
        "--model-config": (args.model_config, None),
        "--templates": (args.templates, None),
    }
    bad = [f"{k} {v!r} (paper: {want!r})" for k, (v, want) in fixed.items() if v is not None and v != want]
    if bad:
        raise UserError(f"--paper fixes these settings; drop them or drop --paper: {'; '.join(bad)}")


def _templates_setting(value: str) -> str:
    """``--templates`` as a fingerprint value: the set name, or the file name and its content's SHA-256."""
    from naclip.text import TEMPLATE_SETS

    if value in TEMPLATE_SETS:
        return value
    try:
        digest = hashlib.sha256(Path(value).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise UserError(f"--templates: cannot read {value!r}: {e}") from None
    return f"{value} (sha256 {digest})"


def _fingerprint(dataset, settings: dict, extra: dict) -> dict:
    h = hashlib.sha256()
    for s in dataset.samples:
        h.update(s.id.encode("utf-8") + b"\n")
    fp = {
        "dataset": dataset.name,
        "split": dataset.split,
        "num_images": len(dataset),
        "ids_sha256_16": h.hexdigest()[:16],
        "num_classes": dataset.num_classes,
    }
    fp.update({f"setting.{k}": v for k, v in settings.items()})
    fp.update(extra)
    return fp


# ------------------------------------------------------------------------------------------ model, ranks


def _build_predictor(settings: dict, args, device: str):
    """(predict(image) -> labels, segmenter) for the settings; model errors become ``UserError``."""
    import torch

    from naclip.segmenter import SegmentConfig

    register_model_config(args.model_config)
    templates = templates_arg(args.templates)
    torch.manual_seed(args.seed)
    try:
        seg = load_segmenter(
            model=settings["model"], pretrained=settings["pretrained"], method=settings["method"],
            checkpoint=settings["checkpoint"], device=device, dtype=resolve_dtype(args.dtype),
            backend=args.backend, text_cache=not args.no_text_cache, gaussian_std=settings["gaussian_std"],
            config=SegmentConfig(templates=templates) if templates else None,
        )  # fmt: skip
    except RuntimeError as e:  # e.g. CUDA errors while building the model: one line, as for bad flags
        raise UserError(str(e)) from None
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


# ------------------------------------------------------------------------------------------------- run


def run(args) -> int:
    """``naclip eval`` on parsed ``args``; returns the exit status (2 with one ``error:`` line)."""
    try:
        return run_reporting_errors(_run, args)
    finally:
        distributed.teardown()


def _run(args) -> int:
    from naclip.presets import get_preset

    name = canonical_name(args)
    preset = get_preset(name)
    settings = resolve_settings(args, preset)
    args.out = args.out or os.path.join("naclip_eval", name)
    rank, world, device = distributed.setup(args.device)
    dataset = open_dataset(args)
    if args.paper and args.dtype is None and device.startswith("cuda"):
        args.dtype = "fp16"  # the official numbers come from an fp16 pipeline on GPU (spec §7.8)
    t0 = time.perf_counter()
    predictor, seg = _build_predictor(settings, args, device)
    timing = {"model_load_s": time.perf_counter() - t0}
    extra = {"dtype": dtype_name(seg.dtype), "device_type": device.split(":")[0]}
    if settings["pretrained"] in (None, "none", ""):
        extra["seed"] = args.seed
    progress = progress_default(args.progress)
    t0 = time.perf_counter()
    with text_progress(disable=not progress or rank != 0) as text_bar:  # before the image bar starts
        seg.text_features(preset.classes, progress=text_bar)
    timing["text_features_s"] = time.perf_counter() - t0
    if rank == 0:
        print(
            f"naclip eval: {dataset.spec.title}, {len(dataset)} images in {dataset.root}; "
            f"settings {settings}; out {args.out}" + (f"; {world} ranks" if world > 1 else ""),
            file=sys.stderr,
        )
    outcome = run_evaluation(
        dataset, predictor, args, log_dir=Path(args.out) / "progress",
        fingerprint=_fingerprint(dataset, settings, extra), progress=progress, progress_desc=f"eval {name}",
        on_prediction=_label_png_writer(args.save_pred, dataset),
    )  # fmt: skip
    if rank == 0:
        run_info = {"dtype": extra["dtype"], "device": device, "world": world, "timing": timing}
        _report(args, name, dataset, outcome, settings=settings, **run_info)
    return EXIT_OK


def _report(args, name, dataset, outcome, *, settings, dtype, device, world, timing) -> None:
    """Rank 0: the paper's mIoU (``--paper``), the run's config and timings, then :func:`finish`."""
    from naclip.eval.paper import paper_miou
    from naclip_kernels import get_default_backend

    paper = None
    if args.paper:
        value, source = paper_miou(name, settings["pamr"], settings["method"])
        paper = {"mIoU": value, "source": source}
    config = dict(
        settings, paper=bool(args.paper), dtype=dtype, device=device, seed=args.seed,
        workers=args.workers,
    )  # fmt: skip
    config["backend"] = args.backend if args.backend is not None else get_default_backend()
    timing = dict(outcome.timing, **timing)
    finish(args, dataset, outcome, config=config, paper=paper, device=device, world=world, timing=timing)
