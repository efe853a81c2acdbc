"""``naclip score --dataset NAME --root PATH --pred DIR [--out DIR]``: score predicted label PNGs
(``<image stem>.png`` or ``<image stem>_mask.png`` as written by ``naclip segment``; values = class ids of the
dataset) with the metrics and outputs of ``naclip eval`` (default ``--out``: ``naclip_eval/<dataset>_score``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from naclip.cli._args import EXIT_OK
from naclip.cli._benchmark import (
    add_dataset_arguments,
    canonical_name,
    finish,
    open_dataset,
    progress_default,
    run_evaluation,
    run_reporting_errors,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``score`` on an argparse sub-parsers object (``func`` = :func:`run`)."""
    p = subparsers.add_parser(
        "score",
        help="score predicted label PNGs on a benchmark",
        description="Score predicted label PNGs (<image stem>.png or <image stem>_mask.png, values = class "
        "ids) with the mmseg IoU protocol; writes results.json / results.md / confusion.npy.",
    )
    add_dataset_arguments(p)
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label PNGs")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """``naclip score`` on parsed ``args``; returns the exit status (2 with one ``error:`` line)."""
    return run_reporting_errors(_run, args)


def _run(args) -> int:
    name = canonical_name(args)
    args.out = args.out or os.path.join("naclip_eval", f"{name}_score")
    dataset = open_dataset(args, pred_dir=args.pred)
    outcome = run_evaluation(
        dataset, None, args, progress=progress_default(args.progress), progress_desc=f"score {name}"
    )
    config = {"pred": str(Path(args.pred).resolve()), "workers": args.workers}
    finish(args, dataset, outcome, config=config, paper=None, device=None, world=1, timing=outcome.timing)
    return EXIT_OK
