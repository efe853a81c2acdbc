"""``naclip demo``: serve the Gradio page of :mod:`naclip.demo` (extra ``[demo]``) with the same model options
as ``segment``, ``--max-pixels``, ``--host`` / ``--port`` / ``--share`` (off by default). The model is loaded
once, before the server starts; a missing Gradio, a bad port or a port in use is a ``UserError``.
"""

from __future__ import annotations

import argparse
import sys

from naclip.cli._args import (
    EXIT_OK,
    UserError,
    add_max_pixels_argument,
    add_model_arguments,
    add_text_args,
    positive_int,
    templates_arg,
)
from naclip.cli._loader import load_segmenter, model_options, register_model_config


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on an argparse sub-parsers object (``func`` = :func:`run`)."""
    p = subparsers.add_parser(
        "demo",
        help="serve a browser demo (Gradio, extra [demo])",
        description="Serve a Gradio page to segment images interactively: upload, paste or capture an image, "
        "type classes or pick a preset; overlay, heat maps, class areas, mask and JSON downloads. The model "
        "is loaded once; nothing is sent anywhere but to the browser.",
    )
    add_model_arguments(p)
    add_text_args(p)
    add_max_pixels_argument(p, what="images")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1 only)")
    p.add_argument("--port", type=positive_int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument(
        "--share", action="store_true", help="also open a public gradio.live tunnel (off by default; online)"
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """``naclip demo`` on parsed ``args``: load the model, then serve until interrupted."""
    from naclip import demo
    from naclip.segmenter import SegmentConfig

    try:
        demo.require_gradio()
    except ImportError as exc:
        raise UserError(str(exc)) from None
    register_model_config(args.model_config)
    std = {"gaussian_std": args.gaussian_std} if args.gaussian_std is not None else {}
    templates = templates_arg(args.templates)
    try:
        config = SegmentConfig(
            max_pixels=args.max_pixels or None, **std, **({"templates": templates} if templates else {})
        )
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    seg = load_segmenter(**model_options(args), config=config)
    print(f"naclip demo: serving on http://{args.host}:{args.port}/ (Ctrl+C to stop)", file=sys.stderr)
    try:
        demo.launch(seg, host=args.host, port=args.port, share=args.share)
    except (ValueError, TypeError, OSError) as exc:  # port out of range or in use
        raise UserError(f"demo: {exc}") from None
    return EXIT_OK
