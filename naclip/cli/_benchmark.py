"""What ``naclip eval`` and ``naclip score`` share: the dataset options (:func:`add_dataset_arguments`),
opening the split (:func:`open_dataset`), the error wrapper that prints one ``error:`` line and returns exit
status 2 (:func:`run_reporting_errors`), and writing ``results.json`` / ``results.md`` / ``confusion.npy``
with the warnings on out-of-range labels (:func:`finish`).
"""

from __future__ import annotations

import argparse
import sys

from naclip.cli._args import EXIT_USAGE, UserError, non_negative_int, positive_int


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--root``, ``--split``, ``--out``, ``--limit``, ``--workers``, ``--[no-]progress``."""
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


def run_reporting_errors(run, args) -> int:
    """``run(args)``; a :class:`UserError` is printed as one ``error:`` line and gives :data:`EXIT_USAGE`."""
    try:
        return run(args)
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for errors re-raised from a DataLoader worker, the original error's last
    line."""
    msg = str(exc).strip()
    if "Original Traceback" in msg:
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        msg = lines[-1].split(": ", 1)[-1] if lines else msg
    return msg


def canonical_name(args) -> str:
    """``--dataset`` as its canonical key (``UserError`` naming ``--dataset`` otherwise)."""
    from naclip.eval.datasets import canonical_dataset_name

    try:
        return canonical_dataset_name(args.dataset)
    except ValueError as e:
        raise UserError(f"--dataset: {e}") from None


def progress_default(flag: bool | None) -> bool:
    """``--progress`` / ``--no-progress``, else a bar only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def open_dataset(args, pred_dir=None):
    """The ``--dataset`` / ``--root`` / ``--split`` :class:`naclip.eval.datasets.EvalDataset`."""
    from naclip.eval.datasets import EvalDataset

    try:
        return EvalDataset(args.dataset, args.root, split=args.split, pred_dir=pred_dir)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def run_evaluation(dataset, predictor, args, **kw):
    """:func:`naclip.eval.runner.evaluate` over ``--limit`` images with ``--workers`` (``kw`` passed on);
    its OSError / ValueError becomes a :class:`UserError`."""
    from naclip.eval.runner import evaluate, select_indices

    try:
        indices = select_indices(len(dataset), args.limit)
        return evaluate(dataset, predictor, indices=indices, num_workers=args.workers, **kw)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def finish(args, dataset, outcome, *, config: dict, paper: dict | None, device: str | None, world: int,
           timing: dict) -> dict:  # fmt: skip
    """Write the results into ``--out``, print the table and the label warnings; returns the results."""
    from naclip.eval.report import build_results, environment_info, markdown_table, write_outputs
    from naclip.presets import get_preset

    run = {
        "resumed_images": outcome.resumed,
        "processed_images": outcome.processed,
        "world_size": world,
        "torn_bytes_discarded": outcome.torn_bytes,
        "limit": args.limit,
    }
    results = build_results(
        dataset=dataset.name, title=dataset.spec.title, split=dataset.split, root=str(dataset.root),
        class_names=list(get_preset(dataset.name).class_names), metrics=outcome.metrics,
        num_images=len(outcome.indices), config=config, run=run, timing=timing, paper=paper,
        env=environment_info(device),
    )  # fmt: skip
    paths = write_outputs(args.out, results, outcome.hist)
    print(markdown_table(results), end="")
    _warn_out_of_range(outcome.metrics)
    print(f"wrote {paths['json']}, {paths['md']}, {paths['confusion']}", file=sys.stderr)
    return results


def _warn_out_of_range(m) -> None:
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
