"""Command line: ``naclip segment | eval | score`` (console script ``naclip``, also ``python -m naclip``).

``naclip segment IMAGES_OR_DIRS (--classes "sky, cloud; tree; person" | --preset voc21 | --classes-file F)
--out DIR`` segments every image (directories are scanned non-recursively for image files) and writes,
atomically and into ``--out`` only:

* ``<stem>_mask.png``: palette PNG, pixel value = class index;
* ``<stem>_overlay.png``: the image blended with the class colours, with a legend (``--no-overlay`` to skip);
* ``<stem>_probs.npy``: float32 ``[C, H, W]`` class probabilities (only with ``--probs``).

An output path that is also an input is refused up front. A file that cannot be read or segmented is reported
and the others are still processed; the exit status is then 1. User errors (bad arguments, unknown preset,
missing weights when offline, ...) print one ``error:`` line and exit with status 2, without a traceback (set
``NACLIP_DEBUG=1`` to get tracebacks). ``eval`` and ``score`` come from :mod:`naclip.eval.cli`.

Shared argparse helpers for both command lines (``naclip.eval.cli`` imports them from here):
:func:`probability`, :func:`positive_int`, :func:`non_negative_int` and the choice tuples :data:`DTYPES`,
:data:`MODES`, :data:`BACKENDS`, :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from naclip.inference import MODES as _MODES
from naclip.segmenter import DTYPES as _SEG_DTYPES
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
METHODS: tuple[str, ...] = tuple(_STRATEGIES)

EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2


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


def probability(text: str) -> float:
    """argparse ``type=``: a number in ``[0, 1]`` (NaN rejected; ``ArgumentTypeError`` otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


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
    p.add_argument("--mode", choices=MODES, help="inference mode (default: the preset's, else whole)")
    p.add_argument(
        "--pamr", action=argparse.BooleanOptionalAction, default=None, help="PAMR refinement (default: on)"
    )
    p.add_argument("--prob-thd", type=probability, metavar="P", help="max probability below P -> class 0")
    p.add_argument(
        "--short-side", type=positive_int, metavar="PX", help="resize short side to PX (default 336)"
    )
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: ViT-B-16)")
    p.add_argument(
        "--pretrained",
        default="openai",
        help='open_clip pretrained tag (default: openai), or "none" for random weights',
    )
    p.add_argument("--checkpoint", metavar="PATH", help="local checkpoint file (overrides --pretrained)")
    p.add_argument(
        "--model-config",
        metavar="JSON",
        help="register an extra open_clip model config file (its file stem becomes a --model name)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="naclip",
        help="attention strategy of the last block (default: naclip)",
    )
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default: fp32)")
    p.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="attention kernel backend (default: auto)"
    )
    p.add_argument(
        "--overlay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <stem>_overlay.png (default)",
    )
    p.add_argument("--probs", action="store_true", help="also write <stem>_probs.npy (float32 [C, H, W])")
    from naclip.io import DEFAULT_MAX_PIXELS

    p.add_argument(
        "--max-pixels",
        type=non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse images (and resized model inputs) with more than N pixels "
        f"(default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)",
    )
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.set_defaults(func=_run_segment)


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
    _add_external_parsers(subparsers)
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
    return p.name.endswith(("_mask.png", "_overlay.png", "_probs.npy"))


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


def plan_outputs(inputs: Sequence[Path], out_dir: Path, *, overlay: bool, probs: bool) -> list[OutputPaths]:
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
            )
        )
    input_keys = {p.resolve() for p in inputs}
    for plan in plans:
        for target in (plan.mask, plan.overlay, plan.probs):
            if target is not None and target.resolve() in input_keys:
                raise UserError(
                    f"output {str(target)!r} would overwrite an input; choose another --out directory"
                )
    return plans


def _load_segmenter(args):
    from naclip.hub import WeightsUnavailableError
    from naclip.segmenter import SegmentConfig, Segmenter

    if args.model_config:
        cfg = Path(args.model_config)
        if not cfg.is_file():
            raise UserError(f"--model-config {args.model_config!r} does not exist")
        import open_clip

        open_clip.add_model_config(cfg)
    pretrained = None if str(args.pretrained).lower() in ("none", "") else args.pretrained
    checkpoint = args.checkpoint
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"--checkpoint {checkpoint!r} does not exist")
    try:
        seg = Segmenter.from_pretrained(
            args.model,
            pretrained,
            device=args.device,
            dtype=args.dtype,
            method=args.method,
            checkpoint=checkpoint,
            backend=args.backend,  # an explicit "auto" stays "auto" (NACLIP_ATTN_BACKEND only for None)
            config=SegmentConfig(max_pixels=args.max_pixels or None),
        )
    except WeightsUnavailableError as exc:
        raise UserError(str(exc)) from None
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad model name, tag, device, dtype, method
        raise UserError(str(exc)) from None
    return seg


def _run_segment(args) -> int:
    from naclip.presets import get_preset

    if args.classes is not None:
        classes, preset = parse_classes_arg(args.classes), None
    elif args.classes_file is not None:
        classes, preset = _read_classes_file(args.classes_file), None
    else:
        classes, preset = None, args.preset
        try:
            get_preset(preset)
        except (KeyError, ValueError) as exc:
            raise UserError(str(exc)) from None

    out_dir = Path(args.out)
    inputs = collect_inputs(args.inputs, skip_outputs_in=out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a directory")
    plans = plan_outputs(inputs, out_dir, overlay=args.overlay, probs=args.probs)

    from tqdm.auto import tqdm

    seg = _load_segmenter(args)
    spec = classes if classes is not None else get_preset(preset).classes
    # encode the class prompts once, before any image (cached by the Segmenter); a bar for long class lists
    with tqdm(total=len(spec.queries), unit="query", desc="text features", leave=False, file=sys.stderr,
              disable=args.no_progress or len(spec.queries) < 32) as text_bar:  # fmt: skip

        def progress(done: int, total: int) -> None:
            text_bar.update(done - text_bar.n)

        try:
            seg.text_features(spec, progress=progress)
        except (ValueError, TypeError) as exc:
            raise UserError(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)

    protect = list(inputs)
    failures: list[tuple[Path, str]] = []
    bar = tqdm(
        total=len(inputs), unit="img", desc="naclip segment", disable=args.no_progress, file=sys.stderr
    )
    debug = bool(os.environ.get("NACLIP_DEBUG"))
    try:
        for path, plan in zip(inputs, plans, strict=True):
            bar.set_postfix_str(path.name, refresh=False)
            try:
                result = seg.predict(
                    path, classes, preset=preset, mode=args.mode, pamr=args.pamr, prob_thd=args.prob_thd,
                    short_side=args.short_side,
                )  # fmt: skip
                result.save_mask(plan.mask, protect=protect)
                if plan.overlay is not None:
                    result.save_overlay(plan.overlay, protect=protect)
                if plan.probs is not None:
                    result.save_probs(plan.probs, protect=protect)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                if debug:
                    raise
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                failures.append((path, msg))
                tqdm.write(f"error: {path}: {msg}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()

    done = len(inputs) - len(failures)
    print(
        f"naclip segment: {done} of {len(inputs)} image(s) segmented into {str(out_dir)!r}",
        file=sys.stderr,
    )
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for path, msg in failures:
            print(f"  {path}: {msg}", file=sys.stderr)
        return EXIT_FAILED_FILES
    return EXIT_OK


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
