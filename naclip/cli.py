"""Command line: ``naclip segment | demo | eval | score`` (console script ``naclip``, or ``python -m
naclip``).

``naclip segment IMAGES_OR_DIRS (--classes "sky, cloud; tree; person" | --preset voc21 | --classes-file F)
--out DIR`` segments every image (directories are scanned non-recursively for image files) and writes,
atomically and into ``--out`` only:

* ``<stem>_mask.png``: palette PNG, pixel value = class index (255 = "unknown": below ``--prob-thd`` when no
  user class is a background; presets keep their class 0 background);
* ``<stem>_overlay.png``: the image blended with the class colours, with a legend (``--no-overlay`` to skip);
* ``<stem>_probs.npy``: float32 ``[C, H, W]`` class probabilities (only with ``--probs``);
* ``<stem>.json``: size, per-class pixels / fraction / mean probability and the settings (``--json``);
* ``<stem>_heatmaps.png``: titled grid of the per-class probability maps with a colour bar (``--heatmaps``).

A video input (:data:`naclip.video.VIDEO_SUFFIXES`) gives ``<stem>_overlay.mp4`` (same frame count, size and
rate), ``<stem>_frames.json`` (per-frame class areas) and, with ``--frame-masks``,
``<stem>_masks/NNNNNN_mask.png``; ``--batch`` frames go through the model at a time.

An output path that is also an input is refused up front. Every check that needs no model (readable image,
size against the model's patch and the pixel limit, class count, a creatable ``--out``) runs before the model
loads; ``--out`` is created only then and removed again if nothing was written. A file that cannot be read or
segmented is reported and the others are still processed; the exit status is then 1. User errors (bad
arguments, unknown preset, missing weights when offline, ...) print one ``error:`` line and exit with status
2, without a traceback (set ``NACLIP_DEBUG=1`` to get tracebacks). ``eval`` and ``score`` come from
:mod:`naclip.eval.cli`. ``naclip cache info|clear`` shows or deletes the on-disk text-feature cache
(:mod:`naclip.text_cache`). ``naclip demo`` serves :mod:`naclip.demo` (the same model options,
``--max-pixels``, ``--host``/``--port``/``--share``).

Shared argparse helpers for both command lines (``naclip.eval.cli`` imports them from here): the option groups
:func:`add_model_arguments` and :func:`add_inference_arguments` (the one home of those options), the text
options (:func:`add_text_args`, :func:`templates_arg`, :func:`text_progress`), :func:`probability`,
:func:`positive_int`, :func:`non_negative_int` and the choice tuples :data:`DTYPES`, :data:`MODES`,
:data:`BACKENDS`, :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from naclip.inference import MODES as _MODES
from naclip.methods import METHOD_NAMES as _METHOD_NAMES
from naclip.segmenter import DTYPES as _SEG_DTYPES
from naclip.segmenter import Segmenter as _Segmenter
from naclip.strategies import STRATEGIES as _STRATEGIES
from naclip_kernels.api import BACKENDS as _BACKENDS

__all__ = [
    "BACKENDS",
    "DTYPES",
    "IMAGE_SUFFIXES",
    "METHODS",
    "MODES",
    "OutputPaths",
    "UserError",
    "add_inference_arguments",
    "add_model_arguments",
    "build_parser",
    "collect_inputs",
    "main",
    "non_negative_int",
    "parse_classes_arg",
    "plan_outputs",
    "positive_int",
    "probability",
]

#: File suffixes picked up when a directory is given as input (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: Choices shared by ``naclip segment`` and ``naclip eval`` (import them from here), each taken from its
#: single home: dtype names (:data:`naclip.segmenter.DTYPES`), inference modes
#: (:data:`naclip.inference.MODES`), attention backends (:data:`naclip_kernels.api.BACKENDS`),
#: attention strategies (:data:`naclip.strategies.STRATEGIES`).
DTYPES: tuple[str, ...] = tuple(_SEG_DTYPES)
MODES: tuple[str, ...] = tuple(_MODES)
BACKENDS: tuple[str, ...] = tuple(_BACKENDS)
#: methods (:data:`naclip.methods.METHODS`), then the remaining ablation strategies.
METHODS: tuple[str, ...] = tuple(dict.fromkeys([*_METHOD_NAMES, *_STRATEGIES]))

EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2


def _signature_defaults(fn) -> dict:
    import inspect

    return {k: v.default for k, v in inspect.signature(fn).parameters.items()}


#: Model / tag / method used when the flags are not given: those of ``Segmenter.from_pretrained``.
_FROM_PRETRAINED = _signature_defaults(_Segmenter.from_pretrained)


class UserError(Exception):
    """An error caused by the invocation (printed as one line, exit status 2)."""


# ------------------------------------------------------------------------------------------------- parsing


def _version() -> str:
    from naclip import __version__

    return __version__


def _int_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer ``>= 1`` (``ArgumentTypeError`` naming the expected and the given
    text)."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer ``>= 0`` (``ArgumentTypeError`` naming the expected and the given
    text)."""
    return _int_at_least(0, text)


def byte_size(text: str) -> int:
    """argparse ``type=``: a positive byte count, optionally with a binary suffix ``K``, ``M``, ``G``
    (``2G`` = 2·1024³; ``ArgumentTypeError`` naming the expected and the given text)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    mult = units.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        value = 0.0
    if not (value >= 1 and value < 1 << 50):
        raise argparse.ArgumentTypeError(f"expected a positive size such as 512M or 2G, got {text!r}")
    return int(value)


def probability(text: str) -> float:
    """argparse ``type=``: a number in ``[0, 1]`` (NaN rejected; ``ArgumentTypeError`` otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _config_default(name: str):
    from naclip.segmenter import SegmentConfig

    return getattr(SegmentConfig(), name)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options of ``segment`` and ``eval`` (their one home): ``--model``, ``--pretrained``,
    ``--checkpoint``, ``--model-config``, ``--method``, ``--gaussian-std``, ``--device``, ``--dtype``,
    ``--backend``. All default to ``None`` = the library's default (named in the help; ``--backend``:
    ``$NACLIP_ATTN_BACKEND``, else ``auto``; an explicit value, ``auto`` included, overrides the variable)."""
    lib = _FROM_PRETRAINED
    p.add_argument("--model", metavar="NAME", help=f"open_clip model name (default {lib['model']})")
    p.add_argument(
        "--pretrained",
        metavar="TAG",
        help=f'open_clip pretrained tag (default {lib["pretrained"]}; "none" = random weights)',
    )
    p.add_argument("--checkpoint", metavar="PATH", help="local checkpoint file (instead of downloading)")
    p.add_argument(
        "--model-config",
        metavar="JSON",
        help="register an extra open_clip model config file (its file stem becomes a --model name)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        help="method: naclip, clearclip, sclip, resclip, scclip (their official settings per preset), or a "
        f"last-block ablation strategy (default {lib['method']})",
    )
    p.add_argument(
        "--gaussian-std",
        type=_positive_float,
        metavar="S",
        help=f"std of the Gaussian attention bias in patches (default {_config_default('gaussian_std'):g})",
    )
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default fp32; eval --paper: fp16 on CUDA)")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="attention kernel backend (default: $NACLIP_ATTN_BACKEND, else auto; an explicit value, auto "
        "included, overrides the variable)",
    )


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """The per-image settings of ``segment`` and ``eval`` (their one home): ``--mode``, ``--pamr``,
    ``--prob-thd``, ``--short-side``, ``--crop``, ``--stride``; ``None`` = the preset's value, else the
    :class:`naclip.segmenter.SegmentConfig` default (named in the help)."""
    d = _config_default
    p.add_argument("--mode", choices=MODES, help=f"inference mode (default: the preset's, else {d('mode')})")
    p.add_argument(
        "--pamr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"PAMR refinement (default: the preset's, else {'on' if d('pamr') else 'off'})",
    )
    p.add_argument(
        "--prob-thd",
        type=probability,
        metavar="P",
        help="pixels whose best class probability is below P become background/unknown "
        f"(default: the preset's, else {d('prob_thd'):g})",
    )
    p.add_argument(
        "--short-side",
        type=positive_int,
        metavar="PX",
        help=f"resize the short side to PX (default: the preset's, else {d('short_side')})",
    )
    p.add_argument("--crop", type=positive_int, metavar="PX", help=f"slide window size (default {d('crop')})")
    p.add_argument("--stride", type=positive_int, metavar="PX", help=f"slide step (default {d('stride')})")


def _add_segment_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment images into named classes",
        description="Segment images into the given classes and write a palette mask, an overlay and "
        "optionally the class probabilities into --out.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories of images"
    )
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
    add_inference_arguments(p)
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
    add_model_arguments(p)
    from naclip.io import DEFAULT_MAX_PIXELS, OVERLAY_ALPHA

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
    p.add_argument(
        "--exif-orientation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn photos upright by their EXIF Orientation tag before segmenting (default on; "
        "--no-exif-orientation keeps the pixels as stored)",
    )
    p.add_argument(
        "--max-pixels",
        type=non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images (and resized model inputs) with more than N pixels "
        f"(default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)",
    )
    p.add_argument("--batch", type=positive_int, metavar="N", help="video frames per model batch (default 8)")
    p.add_argument("--frame-masks", action="store_true", help="video: also write a mask PNG per frame")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    add_text_args(p)
    p.set_defaults(func=_run_segment)


def add_text_args(p: argparse.ArgumentParser) -> None:
    """``--templates`` and ``--no-text-cache`` (shared by ``segment`` and ``eval``)."""
    from naclip.text import TEMPLATE_SETS

    p.add_argument(
        "--templates",
        metavar="NAME|FILE",
        help="prompt templates: a built-in set (" + ", ".join(TEMPLATE_SETS) + "; default imagenet80, "
        "NACLIP's) or a file with one template per line containing {}. CHANGES THE RESULT: other templates "
        "give other text features",
    )
    p.add_argument(
        "--no-text-cache",
        action="store_true",
        help="neither read nor write the on-disk text-feature cache ($NACLIP_CACHE_DIR, see naclip cache)",
    )


def templates_arg(value: str | None):
    """``--templates``: ``None`` -> ``None`` (the default set), else :func:`naclip.text.load_templates`
    (its ValueError becomes a :class:`UserError`)."""
    if value is None:
        return None
    from naclip.text import load_templates

    try:
        return load_templates(value)
    except ValueError as exc:
        raise UserError(f"--templates: {exc}") from None


@contextlib.contextmanager
def text_progress(*, disable: bool, desc: str = "text features"):
    """A ``progress(done, total)`` callback for :meth:`naclip.Segmenter.text_features` that draws a tqdm bar
    on stderr from its first call (so nothing shows when every query comes from a cache)."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if disable:
            return
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="query", desc=desc, leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _add_cache_parser(subparsers) -> None:
    from naclip.text_cache import CACHE_ENV

    p = subparsers.add_parser(
        "cache",
        help="show or clear the on-disk text-feature cache",
        description=f"The text-feature cache lives in ${CACHE_ENV} (default ~/.cache/naclip; set it to the "
        "empty string to turn the cache off).",
    )
    p.add_argument("action", choices=("info", "clear"), help="info: location, entries, sizes; clear: delete")
    p.add_argument("--dir", metavar="DIR", help=f"cache folder (default: ${CACHE_ENV} or ~/.cache/naclip)")
    p.set_defaults(func=_run_cache)


def _run_cache(args) -> int:
    from naclip.text_cache import CACHE_ENV, DiskTextCache, cache_root

    root = Path(args.dir) if args.dir else cache_root()
    if root is None:
        print(f"naclip cache: off (${CACHE_ENV} is set to the empty string)")
        return EXIT_OK
    cache = DiskTextCache(root)
    try:
        lines = cache.clear_report() if args.action == "clear" else cache.info_report()
    except OSError as exc:
        raise UserError(f"cache {str(cache.text_dir)!r}: {exc}") from None
    print("\n".join(lines))
    return EXIT_OK


def _add_demo_parser(subparsers) -> None:
    from naclip.io import DEFAULT_MAX_PIXELS

    p = subparsers.add_parser(
        "demo",
        help="serve a browser demo (Gradio, extra [demo])",
        description="Serve a Gradio page to segment images interactively: upload, paste or capture an image, "
        "type classes or pick a preset; overlay, heat maps, class areas, mask and JSON downloads. The model "
        "is loaded once; nothing is sent anywhere but to the browser.",
    )
    add_model_arguments(p)
    add_text_args(p)
    p.add_argument(
        "--max-pixels", type=non_negative_int, default=DEFAULT_MAX_PIXELS, metavar="N",
        help=f"refuse images with more than N pixels (default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1 only)")
    p.add_argument("--port", type=positive_int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument(
        "--share", action="store_true", help="also open a public gradio.live tunnel (off by default; online)"
    )
    p.set_defaults(func=_run_demo)


def _add_external_parsers(subparsers) -> None:
    """``eval`` / ``score`` from :mod:`naclip.eval.cli` (part of this package: a failing import is a bug and
    propagates)."""
    from naclip.eval import cli as eval_cli

    eval_cli.add_eval_parser(subparsers)
    eval_cli.add_score_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The ``naclip`` argument parser (sub-commands ``segment`` and, when available, ``eval`` / ``score``)."""
    parser = argparse.ArgumentParser(
        prog="naclip", description="Training-free open-vocabulary segmentation (NACLIP) on open_clip models."
    )
    parser.add_argument("--version", action="version", version=f"naclip {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_segment_parser(subparsers)
    _add_demo_parser(subparsers)
    _add_external_parsers(subparsers)
    _add_cache_parser(subparsers)
    return parser


# ------------------------------------------------------------------------------------------ segment helpers


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


def _is_output_name(p: Path) -> bool:
    return p.name.endswith(("_mask.png", "_overlay.png", "_probs.npy", "_heatmaps.png"))


def collect_inputs(items: Sequence[str], *, skip_outputs_in: Path | None = None) -> list[Path]:
    """Expand files and directories (non-recursive, :data:`IMAGE_SUFFIXES`) into an ordered, de-duplicated
    list.

    A missing path raises :class:`UserError`; a directory without images too. Explicit files are kept whatever
    their suffix (an unreadable one is reported when it is processed). When a scanned directory is
    ``skip_outputs_in`` (the output directory), files named like outputs of an earlier run are skipped.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    skip_dir = skip_outputs_in.resolve() if skip_outputs_in is not None else None
    for item in items:
        p = Path(item)
        if p.is_dir():
            is_out = p.resolve() == skip_dir
            found = sorted(
                c
                for c in p.iterdir()
                if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES and not (is_out and _is_output_name(c))
            )
            if not found:
                raise UserError(f"directory {item!r} contains no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif p.exists():
            found = [p]
        else:
            raise UserError(f"input {item!r} does not exist")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


@dataclass(frozen=True)
class OutputPaths:
    mask: Path
    overlay: Path | None
    probs: Path | None
    json: Path | None = None
    heatmaps: Path | None = None


def plan_outputs(
    inputs: Sequence[Path], out_dir: Path, *, overlay: bool, probs: bool, json: bool = False,
    heatmaps: bool = False,
) -> list[OutputPaths]:  # fmt: skip
    """Output paths per input: ``<stem>_mask.png`` etc.; inputs sharing a stem get ``<stem>_<ext>[_n]``.

    Raises :class:`UserError` when an output path is one of the inputs (inputs are never overwritten).
    """
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    used: set[str] = set()
    plans = []
    for p in inputs:
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower() or 'noext'}"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        plans.append(
            OutputPaths(
                mask=out_dir / f"{name}_mask.png",
                overlay=out_dir / f"{name}_overlay.png" if overlay else None,
                probs=out_dir / f"{name}_probs.npy" if probs else None,
                json=out_dir / f"{name}.json" if json else None,
                heatmaps=out_dir / f"{name}_heatmaps.png" if heatmaps else None,
            )
        )
    input_keys = {p.resolve() for p in inputs}
    for plan in plans:
        for target in (plan.mask, plan.overlay, plan.probs, plan.json, plan.heatmaps):
            if target is not None and target.resolve() in input_keys:
                raise UserError(
                    f"output {str(target)!r} would overwrite an input; choose another --out directory"
                )
    return plans


def _register_model_config(path: str | None) -> None:
    """``--model-config JSON``: register it with open_clip (its file stem becomes a model name)."""
    if path:
        cfg = Path(path)
        if not cfg.is_file():
            raise UserError(f"--model-config {path!r} does not exist")
        import open_clip

        open_clip.add_model_config(cfg)


def _load_segmenter(args, config):
    from naclip.hub import WeightsUnavailableError
    from naclip.segmenter import Segmenter

    pretrained = args.pretrained if args.pretrained is not None else _FROM_PRETRAINED["pretrained"]
    pretrained = None if str(pretrained).lower() in ("none", "") else pretrained
    checkpoint = args.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint!r} does not exist")
    try:
        seg = Segmenter.from_pretrained(
            args.model or _FROM_PRETRAINED["model"],
            pretrained,
            device=args.device,
            dtype=args.dtype,
            method=args.method or _FROM_PRETRAINED["method"],
            checkpoint=checkpoint,
            backend=args.backend,  # None: $NACLIP_ATTN_BACKEND, else auto; an explicit value wins
            config=config,
            text_cache=False if args.no_text_cache else None,
        )
    except WeightsUnavailableError as exc:
        raise UserError(str(exc)) from None
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad model name, tag, device, dtype, method
        raise UserError(str(exc)) from None
    return seg


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


def _check_out_dir(out_dir: Path) -> None:
    """``--out`` is, or can become, a writable directory (checked without creating anything)."""
    where = f"--out {str(out_dir)!r}"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{where} exists and is not a directory")
    probe = out_dir
    while not probe.exists():
        if probe.is_symlink():
            raise UserError(f"{where}: {str(probe)!r} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{where} cannot be created: {str(probe)!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == out_dir else f"cannot be created: {str(probe)!r} is read-only"
        raise UserError(f"{where} {what}")


def _make_out_dir(out_dir: Path) -> list[Path]:
    """Create ``--out`` (and missing parents) and check a file can be written there; returns the
    directories created, deepest first (removed again by :func:`_remove_if_empty` when nothing was
    written). ``UserError`` for a read-only file system, a permission error, ..."""
    created = []
    probe = out_dir
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        _remove_if_empty(created)
        raise UserError(
            f"--out {str(out_dir)!r} cannot be created or written: {exc.strerror or exc}"
        ) from None
    return created


def _remove_if_empty(dirs: Sequence[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _precheck_inputs(inputs: Sequence[Path], args, config, preset) -> list[tuple[Path, str]]:
    """Every check on the inputs that needs no model (readable header, pixel limit, at least one patch,
    resized input size); returns ``(path, message)`` of the inputs that fail."""
    from naclip.hub import vit_patch_size
    from naclip.io import probe_image
    from naclip.presets import get_preset
    from naclip.segmenter import check_input_size

    try:
        patch = vit_patch_size(args.model or _FROM_PRETRAINED["model"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"--model: {exc}") from None
    pre = get_preset(preset) if preset is not None else None
    mode = args.mode or (pre.mode if pre is not None else config.mode)
    short, long = args.short_side, args.long_side
    if mode != "single":  # single mode: native unless the sizes are given
        short = short or (pre.short_side if pre is not None else config.short_side)
        long = long or (pre.long_side if pre is not None else config.long_side)
    bad = []
    for path in inputs:
        try:
            if path.suffix.lower() in _video_suffixes():
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
            bad.append((path, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__))
    return bad


def _check_palette_classes(spec, preset) -> None:
    from naclip.io import UNKNOWN_LABEL

    limit = UNKNOWN_LABEL + 1 if preset is not None else UNKNOWN_LABEL
    if spec.num_classes > limit:
        raise UserError(
            f"{spec.num_classes} classes do not fit a palette PNG mask: at most {limit} (values "
            f"0..{limit - 1}{'' if preset is not None else f', {UNKNOWN_LABEL} = unknown'})"
        )


def _report(done: int, total: int, out_dir: Path, failures: list[tuple[Path, str]]) -> int:
    print(f"naclip segment: {done} of {total} image(s) segmented into {str(out_dir)!r}", file=sys.stderr)
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} failed:", file=sys.stderr)
    for path, msg in failures:
        print(f"  {path}: {msg}", file=sys.stderr)
    return EXIT_FAILED_FILES


def _run_segment(args) -> int:
    from naclip.methods import method_config
    from naclip.segmenter import SegmentConfig

    spec, preset = _resolve_class_args(args)
    _check_palette_classes(spec, preset)
    _register_model_config(args.model_config)
    templates = templates_arg(args.templates)
    try:
        config = SegmentConfig(
            **method_config(args.method),  # the method's official defaults (ClearCLIP: logit scale 50, ...)
            max_pixels=args.max_pixels or None,
            exif_orientation=args.exif_orientation,
            **({"gaussian_std": args.gaussian_std} if args.gaussian_std is not None else {}),
            **({"templates": templates} if templates else {}),
            **({"memory_budget": args.memory_budget} if args.memory_budget else {}),
        )
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    out_dir = Path(args.out)
    inputs = collect_inputs(args.inputs, skip_outputs_in=out_dir)
    _check_out_dir(out_dir)
    plans = plan_outputs(
        inputs, out_dir, overlay=args.overlay, probs=args.probs, json=args.json, heatmaps=args.heatmaps
    )
    failures = _precheck_inputs(inputs, args, config, preset)
    for path, msg in failures:
        print(f"error: {path}: {msg}", file=sys.stderr)
    bad = {p for p, _ in failures}
    todo = [(p, plan) for p, plan in zip(inputs, plans, strict=True) if p not in bad]
    if not todo:  # nothing to segment: no model load, no --out folder
        return _report(0, len(inputs), out_dir, failures)
    created = _make_out_dir(out_dir)
    written = False
    try:
        seg = _load_segmenter(args, config)
        _encode_text(seg, spec, args)
        written = _segment_all(seg, todo, spec if preset is None else None, preset, args, failures, inputs)
    finally:
        if not written:
            _remove_if_empty(created)
    return _report(len(inputs) - len(failures), len(inputs), out_dir, failures)


def _encode_text(seg, spec, args) -> None:
    """Encode the class prompts once, before any image (cached by the Segmenter, in memory and on disk); the
    bar shows from the first query encoded (nothing when every query comes from a cache)."""
    with text_progress(disable=args.no_progress) as progress:
        try:
            seg.text_features(spec, progress=progress)
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc)) from None


def _segment_all(seg, todo, classes, preset, args, failures: list, inputs) -> bool:
    """Segment and write every ``(path, plan)`` of ``todo``; failures are appended (one bad file does not
    stop the others). Returns whether any file was written."""
    from tqdm.auto import tqdm

    protect = list(inputs)
    bar = tqdm(total=len(todo), unit="img", desc="naclip segment", disable=args.no_progress, file=sys.stderr)
    debug = bool(os.environ.get("NACLIP_DEBUG"))
    written = False
    try:
        for path, plan in todo:
            bar.set_postfix_str(path.name, refresh=False)
            try:
                if path.suffix.lower() in _video_suffixes():
                    _segment_video(seg, path, plan, args, classes, preset, protect)
                    written = True
                    bar.update(1)
                    continue
                result = seg.predict(
                    path, classes, preset=preset, mode=args.mode, pamr=args.pamr, prob_thd=args.prob_thd,
                    short_side=args.short_side, crop=args.crop, stride=args.stride,
                    long_side=args.long_side, probs_path=plan.probs,
                    keep_probs=plan.json is not None or plan.heatmaps is not None,  # they read probs
                )  # fmt: skip
                result.save_mask(plan.mask, protect=protect)
                written = True
                if plan.overlay is not None:
                    result.save_overlay(plan.overlay, alpha=args.alpha, protect=protect)
                if plan.json is not None:
                    result.save_json(plan.json, protect=protect)
                if plan.heatmaps is not None:
                    result.save_heatmaps(plan.heatmaps, protect=protect)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                if debug:
                    raise
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                failures.append((path, msg))
                tqdm.write(f"error: {path}: {msg}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    return written


def _run_demo(args) -> int:
    from naclip import demo
    from naclip.segmenter import SegmentConfig

    try:
        demo.require_gradio()
    except ImportError as exc:
        raise UserError(str(exc)) from None
    _register_model_config(args.model_config)
    std = {"gaussian_std": args.gaussian_std} if args.gaussian_std is not None else {}
    templates = templates_arg(args.templates)
    try:
        config = SegmentConfig(
            max_pixels=args.max_pixels or None, **std, **({"templates": templates} if templates else {})
        )
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    seg = _load_segmenter(args, config)
    print(f"naclip demo: serving on http://{args.host}:{args.port}/ (Ctrl+C to stop)", file=sys.stderr)
    try:
        demo.launch(seg, host=args.host, port=args.port, share=args.share)
    except (ValueError, TypeError, OSError) as exc:  # port out of range or in use
        raise UserError(f"demo: {exc}") from None
    return EXIT_OK


def _video_suffixes() -> tuple[str, ...]:
    from naclip.video import VIDEO_SUFFIXES

    return VIDEO_SUFFIXES


def _probe_video(path: Path) -> tuple[int, int]:
    from naclip import video

    try:
        info = video.probe(path)
    except ImportError as exc:  # PyAV missing: this input fails, the images are still processed
        raise ValueError(str(exc)) from None
    return info.height, info.width


def _segment_video(seg, path: Path, plan: OutputPaths, args, classes, preset, protect) -> None:
    """One video: ``<stem>_overlay.mp4``, ``<stem>_frames.json`` and with ``--frame-masks`` the masks."""
    from tqdm.auto import tqdm

    from naclip import outputs, video

    base = plan.mask.with_name(plan.mask.name.removesuffix("_mask.png"))
    total = video.probe(path).frames
    with tqdm(total=total, unit="frame", desc=path.name, leave=False, file=sys.stderr,
              disable=args.no_progress) as frames_bar:  # fmt: skip
        report = video.segment_video(
            seg, path, classes, overlay=f"{base}_overlay.mp4", protect=tuple(protect),
            masks_dir=f"{base}_masks" if args.frame_masks else None, batch=args.batch or video.DEFAULT_BATCH,
            progress=frames_bar.update, preset=preset, mode=args.mode, pamr=args.pamr, prob_thd=args.prob_thd,
            short_side=args.short_side, crop=args.crop, stride=args.stride,
        )  # fmt: skip
    outputs.save_json(f"{base}_frames.json", report, protect=protect)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
