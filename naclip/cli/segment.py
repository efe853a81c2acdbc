"""``naclip segment IMAGES_OR_DIRS (--classes SPEC | --preset NAME | --classes-file F) --out DIR``.

Writes, atomically and into ``--out`` only, per image ``<stem>_mask.png`` (palette PNG, value = class index,
255 = unknown), ``<stem>_overlay.png`` (unless ``--no-overlay``), ``<stem>_probs.npy`` (``--probs``),
``<stem>.json`` (``--json``), ``<stem>_heatmaps.png`` (``--heatmaps``); per video ``<stem>_overlay.mp4``,
``<stem>_frames.json`` and with ``--frame-masks`` ``<stem>_masks/NNNNNN_mask.png``. Every check that needs
no model runs before the model loads; a file that fails is reported, the others are still processed, and
the exit status is then 1. Folders, ``--recursive``, glob patterns, the mirrored output tree,
``--skip-existing``, ``<out>/manifest.jsonl``, decoding ahead and torchrun shares: :mod:`naclip.collection`
(the input loop, :func:`naclip.collection.run_collection`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from naclip import collection
from naclip.cli._args import (
    EXIT_FAILED_FILES,
    EXIT_OK,
    FROM_PRETRAINED,
    UserError,
    add_inference_arguments,
    add_max_pixels_argument,
    add_model_arguments,
    add_text_args,
    byte_size,
    non_negative_int,
    positive_int,
    probability,
    templates_arg,
    text_progress,
)
from naclip.cli._loader import load_segmenter, model_options, register_model_config
from naclip.cli._paths import check_out_dir, make_out_dir, remove_if_empty

# ------------------------------------------------------------------------------------------------ parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``segment`` on an argparse sub-parsers object (``func`` = :func:`run`)."""
    p = subparsers.add_parser(
        "segment",
        help="segment images into named classes",
        description="Segment images into the given classes and write a palette mask, an overlay and "
        "optionally the class probabilities into --out.",
    )
    _add_input_options(p)
    add_inference_arguments(p)
    _add_size_options(p)
    add_model_arguments(p)
    _add_output_options(p)
    _add_reading_options(p)
    add_text_args(p)
    p.set_defaults(func=run)
    return p


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help='image or video files, folders of images, quoted glob patterns ("tiles/**/*.png")',
    )  # fmt: skip
    cls = p.add_mutually_exclusive_group(required=True)
    cls.add_argument(
        "--classes",
        metavar="SPEC",
        help='classes separated by ";", synonyms of one class by ", " (e.g. "sky, cloud; tree; person")',
    )
    cls.add_argument(
        "--preset",
        metavar="NAME",
        help="benchmark preset: classes, threshold, resize, mode (voc21, ade20k, ...)",
    )
    cls.add_argument(
        "--classes-file", metavar="FILE", help='one class per line; synonyms of a class separated by ", "'
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--long-side",
        type=positive_int,
        metavar="PX",
        help="cap the long side at PX (whole/slide default 2048; single: native unless given)",
    )
    p.add_argument(
        "--memory-budget",
        type=byte_size,
        metavar="SIZE",
        help="working memory for crop batches and post-processing tiles, e.g. 512M, 2G (default 2G); "
        "sets tile sizes, not the result",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    from naclip.io import OVERLAY_ALPHA

    p.add_argument(
        "--overlay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <stem>_overlay.png (default)",
    )
    p.add_argument(
        "--alpha",
        type=probability,
        metavar="A",
        default=OVERLAY_ALPHA,
        help=f"overlay opacity of the class colours, 0..1 (default {OVERLAY_ALPHA:g})",
    )
    p.add_argument("--probs", action="store_true", help="also write <stem>_probs.npy (float32 [C, H, W])")
    p.add_argument("--json", action="store_true", help="also write <stem>.json (class areas and settings)")
    p.add_argument("--heatmaps", action="store_true", help="also write <stem>_heatmaps.png (class maps)")


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exif-orientation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn photos upright by their EXIF Orientation tag before segmenting (default on; "
        "--no-exif-orientation keeps the pixels as stored)",
    )
    add_max_pixels_argument(p, what="images (and resized model inputs)")
    p.add_argument("--batch", type=positive_int, metavar="N", help="video frames per model batch (default 8)")
    p.add_argument("--frame-masks", action="store_true", help="video: also write a mask PNG per frame")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    collection.add_collection_args(p, count_type=non_negative_int)


# ----------------------------------------------------------------------------------------------- classes


def parse_classes_arg(spec: str | Sequence[str], what: str = "--classes"):
    """Parse a class list with :func:`naclip.text.parse_classes` (``";"`` between classes, ``", "`` between
    synonyms); its ``ValueError`` / ``TypeError`` (empty list, empty synonym, duplicate) becomes a
    :class:`UserError` prefixed with ``what``. Returns the :class:`naclip.text.ClassSpec`."""
    from naclip.text import parse_classes

    try:
        return parse_classes(spec)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{what}: {exc}") from None


def _read_classes_file(path: str):
    """One class per line (synonyms separated by ``", "``, the official class-file format); trailing blank
    lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--classes-file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --classes-file {path!r}: {exc}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return parse_classes_arg(lines, f"--classes-file {path!r}")


def _resolve_class_args(args):
    """``(ClassSpec, preset name or None)`` from ``--classes`` / ``--classes-file`` / ``--preset``."""
    from naclip.presets import get_preset

    if args.classes is not None:
        return parse_classes_arg(args.classes), None
    if args.classes_file is not None:
        return _read_classes_file(args.classes_file), None
    try:
        return get_preset(args.preset).classes, args.preset
    except (KeyError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _check_palette_classes(spec, preset) -> None:
    from naclip.io import UNKNOWN_LABEL

    limit = UNKNOWN_LABEL + 1 if preset is not None else UNKNOWN_LABEL
    if spec.num_classes > limit:
        raise UserError(
            f"{spec.num_classes} classes do not fit a palette PNG mask: at most {limit} (values "
            f"0..{limit - 1}{'' if preset is not None else f', {UNKNOWN_LABEL} = unknown'})"
        )


# ------------------------------------------------------------------------------------------- prechecks


def _segment_config(args):
    """The :class:`naclip.segmenter.SegmentConfig` of the run: the method's official defaults (ClearCLIP:
    logit scale 50, ...) and the flags given."""
    from naclip.methods import method_config
    from naclip.segmenter import SegmentConfig

    templates = templates_arg(args.templates)
    try:
        return SegmentConfig(
            **method_config(args.method),
            max_pixels=args.max_pixels or None,
            exif_orientation=args.exif_orientation,
            **({"gaussian_std": args.gaussian_std} if args.gaussian_std is not None else {}),
            **({"templates": templates} if templates else {}),
            **({"memory_budget": args.memory_budget} if args.memory_budget else {}),
        )
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _resize_sides(args, config, preset) -> tuple[str, int | None, int | None]:
    """``(mode, short side, long side)`` the model input will get, merged by
    :meth:`naclip.config.SegmentConfig.resolve` (single mode: native resolution unless given)."""
    from naclip.presets import get_preset

    pre = get_preset(preset) if preset is not None else None
    try:
        cfg = config.resolve(pre, mode=args.mode, short_side=args.short_side, long_side=args.long_side)
    except (TypeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    if cfg.mode == "single":
        return cfg.mode, args.short_side, args.long_side
    return cfg.mode, cfg.short_side, cfg.long_side


def _precheck_inputs(inputs: Sequence[Path], args, config, preset) -> list[tuple[Path, str]]:
    """Every check on the inputs that needs no model (readable header, pixel limit, at least one patch,
    resized input size); returns ``(path, message)`` of the inputs that fail."""
    from naclip.hub import vit_patch_size
    from naclip.io import probe_image
    from naclip.segmenter import check_input_size

    try:
        patch = vit_patch_size(args.model or FROM_PRETRAINED["model"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"--model: {exc}") from None
    mode, short, long = _resize_sides(args, config, preset)
    bad = []
    for path in inputs:
        try:
            if collection.is_video(path):
                h, w = _probe_video(path)
            else:
                h, w = probe_image(
                    path, max_pixels=config.max_pixels, exif_orientation=config.exif_orientation
                )
            check_input_size(
                h, w, patch=None if patch is None else (patch, patch), short_side=short, long_side=long,
                max_pixels=config.max_pixels, mode=mode, single_max_pixels=config.single_max_pixels,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            bad.append((path, _first_line(exc)))
    return bad


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------- run


def _report(done: int, total: int, out_dir: Path, failures: list[tuple[Path, str]], skipped: int = 0) -> int:
    kept = f" ({skipped} skipped: outputs already there)" if skipped else ""
    print(
        f"naclip segment: {done} of {total} image(s) segmented into {str(out_dir)!r}{kept}", file=sys.stderr
    )
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} failed:", file=sys.stderr)
    for path, msg in failures:
        print(f"  {path}: {msg}", file=sys.stderr)
    return EXIT_FAILED_FILES


def run(args) -> int:
    """``naclip segment`` on parsed ``args``; returns the exit status (``UserError`` for a bad invocation)."""
    spec, preset = _resolve_class_args(args)
    _check_palette_classes(spec, preset)
    register_model_config(args.model_config)
    config = _segment_config(args)
    out_dir = Path(args.out)
    try:
        inputs = collection.collect_inputs(args.inputs, recursive=args.recursive, out_dir=out_dir)
        check_out_dir(out_dir)
        plans = collection.plan_outputs(
            inputs, out_dir, overlay=args.overlay, probs=args.probs, json=args.json, heatmaps=args.heatmaps
        )
    except collection.CollectionError as exc:
        raise UserError(str(exc)) from None
    options = collection.Options.from_args(args, spec=spec, preset=preset, templates=config.templates)
    hooks = collection.Hooks(
        precheck=lambda paths: _precheck_inputs(paths, args, config, preset),
        make_out_dir=lambda: make_out_dir(out_dir), remove_if_empty=remove_if_empty,
        load=lambda device: _load(args, config, spec, device),
    )  # fmt: skip
    outcome = collection.run_collection(inputs, plans, out_dir, options=options, hooks=hooks)
    if outcome.rank != 0:  # rank 0 reports for all
        return EXIT_FAILED_FILES if outcome.failures else EXIT_OK
    return _report(outcome.done, outcome.total, out_dir, outcome.failures, outcome.skipped)


def _load(args, config, spec, device: str):
    """The segmenter on ``device`` (under torchrun: this rank's GPU), the class texts encoded."""
    seg = load_segmenter(**{**model_options(args), "device": device}, config=config)
    _encode_text(seg, spec, args)
    return seg


def _encode_text(seg, spec, args) -> None:
    """Encode the class prompts once, before any image (cached by the Segmenter, in memory and on disk); the
    bar shows from the first query encoded (nothing when every query comes from a cache)."""
    with text_progress(disable=args.no_progress) as progress:
        try:
            seg.text_features(spec, progress=progress)
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc)) from None


# ----------------------------------------------------------------------------------------------- video


def _probe_video(path: Path) -> tuple[int, int]:
    from naclip import video

    try:
        info = video.probe(path)
    except ImportError as exc:  # PyAV missing: this input fails, the images are still processed
        raise ValueError(str(exc)) from None
    return info.height, info.width
