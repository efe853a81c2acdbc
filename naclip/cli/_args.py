"""The argparse pieces every ``naclip`` subcommand shares, each in one place.

Types (:func:`positive_int`, :func:`non_negative_int`, :func:`probability`, :func:`positive_float`,
:func:`byte_size`: ``ArgumentTypeError`` naming the expected and the given text), the option groups
:func:`add_model_arguments`, :func:`add_inference_arguments`, :func:`add_text_args` (all default to ``None`` =
the library's default, named in the help), the choice tuples :data:`DTYPES`, :data:`MODES`, :data:`BACKENDS`,
:data:`METHODS`, :class:`UserError` (one ``error:`` line, exit status 2) and the text-feature progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from naclip.inference import MODES as _MODES
from naclip.methods import METHOD_NAMES as _METHOD_NAMES
from naclip.segmenter import DTYPES as _SEG_DTYPES
from naclip.segmenter import Segmenter as _Segmenter
from naclip.strategies import STRATEGIES as _STRATEGIES
from naclip_kernels.api import BACKENDS as _BACKENDS

#: Choices shared by ``naclip segment`` and ``naclip eval``, each taken from its single home: dtype names
#: (:data:`naclip.segmenter.DTYPES`), inference modes (:data:`naclip.inference.MODES`), attention backends
#: (:data:`naclip_kernels.api.BACKENDS`), attention strategies (:data:`naclip.strategies.STRATEGIES`).
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
FROM_PRETRAINED = _signature_defaults(_Segmenter.from_pretrained)


class UserError(Exception):
    """An error caused by the invocation (printed as one line, exit status 2)."""


# --------------------------------------------------------------------------------------------- types


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


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number ``> 0`` (``ArgumentTypeError`` otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


# ------------------------------------------------------------------------------------- option groups


def config_default(name: str):
    """The :class:`naclip.segmenter.SegmentConfig` default of field ``name`` (for help texts)."""
    from naclip.segmenter import SegmentConfig

    return getattr(SegmentConfig(), name)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model options of ``segment``, ``eval`` and ``demo`` (their one home): ``--model``,
    ``--pretrained``, ``--checkpoint``, ``--model-config``, ``--method``, ``--gaussian-std``, ``--device``,
    ``--dtype``, ``--backend``. All default to ``None`` = the library's default (named in the help;
    ``--backend``: ``$NACLIP_ATTN_BACKEND``, else ``auto``; an explicit value, ``auto`` included, overrides
    the variable)."""
    lib = FROM_PRETRAINED
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
        type=positive_float,
        metavar="S",
        help=f"std of the Gaussian attention bias in patches (default {config_default('gaussian_std'):g})",
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
    d = config_default
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


def add_max_pixels_argument(p: argparse.ArgumentParser, *, what: str) -> None:
    """``--max-pixels N`` (default :data:`naclip.io.DEFAULT_MAX_PIXELS`, 0 = no limit); ``what`` names what
    is refused in the help."""
    from naclip.io import DEFAULT_MAX_PIXELS

    p.add_argument(
        "--max-pixels",
        type=non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse {what} with more than N pixels (default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)",
    )


def add_text_args(p: argparse.ArgumentParser) -> None:
    """``--templates`` and ``--no-text-cache`` (shared by ``segment``, ``eval`` and ``demo``)."""
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
