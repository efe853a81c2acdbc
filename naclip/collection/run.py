"""One collection run of ``naclip segment``: this rank's share of the inputs, skipped, pre-checked and
segmented, then the merged manifest.

Contract: input ``i`` of the full list belongs to rank ``i % world``; with ``skip_existing`` an input whose
expected outputs are all whole is skipped unless its record names other settings; one bad input is recorded
as failed and the others go on (unless ``fail_fast``); every output file is written atomically and never over
an input; rank 0 writes ``<out>/manifest.jsonl`` after an ``all_gather``. :func:`run_collection` returns the
counts over all ranks (:class:`Outcome`); the command line supplies :class:`Options` and :class:`Hooks`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from naclip.collection.inputs import Input, OutputPaths, _complete, expected_outputs, is_video
from naclip.collection.manifest import (
    _JOURNAL,
    MANIFEST_VERSION,
    _Journal,
    _record,
    _write_manifest,
    read_records,
    settings_fingerprint,
)
from naclip.collection.prefetch import DEFAULT_PREFETCH, prefetch


@dataclass(frozen=True)
class Options:
    """What the run needs from the command line (:meth:`from_args`); ``predict_kw`` go to
    ``Segmenter.predict`` (``long_side`` is left out for videos, as before)."""

    classes: Any  # ClassSpec, or None when the preset gives the classes
    preset: str | None
    predict_kw: dict
    fingerprint: str
    settings: dict
    device: str | None = None
    skip_existing: bool = False
    manifest: bool = True
    fail_fast: bool = False
    prefetch: int = DEFAULT_PREFETCH
    progress: bool = True
    alpha: float = 0.5
    frame_masks: bool = False
    batch: int | None = None
    max_pixels: int | None = None
    exif_orientation: bool = True

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, *, spec: Any, preset: str | None, templates: Sequence[str]
    ) -> Options:
        fingerprint, settings = settings_fingerprint(args, spec, templates)
        keys = ("mode", "pamr", "prob_thd", "short_side", "crop", "stride", "long_side")
        return cls(
            classes=spec if preset is None else None, preset=preset,
            predict_kw={k: getattr(args, k) for k in keys}, fingerprint=fingerprint, settings=settings,
            device=args.device, skip_existing=args.skip_existing, manifest=args.manifest,
            fail_fast=args.fail_fast, prefetch=args.prefetch, progress=not args.no_progress, alpha=args.alpha,
            frame_masks=args.frame_masks, batch=args.batch, max_pixels=args.max_pixels or None,
            exif_orientation=args.exif_orientation,
        )  # fmt: skip


@dataclass(frozen=True)
class Hooks:
    """The command line's parts of a run: ``precheck(paths) -> [(path, message)]`` (checks needing no
    model), ``make_out_dir() -> created folders``, ``remove_if_empty(created)``, ``load(device) ->
    Segmenter`` with the class texts encoded."""

    precheck: Callable[[list[Path]], list[tuple[Path, str]]]
    make_out_dir: Callable[[], list[Path]]
    remove_if_empty: Callable[[list[Path]], None]
    load: Callable[[str], Any]


@dataclass(frozen=True)
class Outcome:
    """Counts over all ranks: ``total`` inputs, ``done``, ``skipped``, ``failures`` ``[(path, message)]``;
    ``rank`` / ``world`` of this process."""

    total: int
    done: int
    skipped: int
    failures: list[tuple[Path, str]]
    rank: int = 0
    world: int = 1


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _say(text: str, rank: int, world: int) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"[rank {rank}] {text}" if world > 1 else text, file=sys.stderr)


def run_collection(
    inputs: Sequence[Input], plans: Sequence[OutputPaths], out_dir: Path, *, options: Options, hooks: Hooks
) -> Outcome:
    """Segment this rank's share of ``inputs`` into ``plans`` (skipping complete outputs with
    ``skip_existing``), journal each input, gather the records over the ranks and let rank 0 write
    ``<out>/manifest.jsonl``. Under torchrun the process group is joined here and left at the end."""
    from naclip import distributed

    rank, world, device = distributed.setup(options.device)
    try:
        return _run(inputs, plans, out_dir, options, hooks, rank=rank, world=world, device=device)
    finally:
        distributed.teardown()


def _triage(inputs, plans, mine, opts: Options, out_dir: Path, hooks: Hooks, rank: int, world: int):
    """Records of the skipped and pre-check failures of ``mine``; returns ``(records, todo)``."""
    previous = read_records(out_dir) if opts.skip_existing and out_dir.is_dir() else {}
    records: dict[int, dict] = {}
    todo, stale = [], 0
    for i in mine:
        outs = expected_outputs(inputs[i].path, plans[i], frame_masks=opts.frame_masks)
        if opts.skip_existing and _complete(outs):
            prev = previous.get(str(inputs[i].path.resolve()), {}).get("fingerprint")
            if prev in (None, opts.fingerprint):
                records[i] = _record(inputs[i], outs, out_dir, "skipped", prev)
                continue
            stale += 1
        todo.append(i)
    if stale:
        _say(f"{stale} input(s) have outputs made with other settings: segmenting them again", rank, world)
    bad = dict(hooks.precheck([inputs[i].path for i in todo]))
    for i in todo:
        if inputs[i].path in bad:
            _say(f"error: {inputs[i].path}: {bad[inputs[i].path]}", rank, world)
            outs = expected_outputs(inputs[i].path, plans[i], frame_masks=opts.frame_masks)
            records[i] = _record(inputs[i], outs, out_dir, "failed", opts.fingerprint, bad[inputs[i].path])
    return records, [i for i in todo if inputs[i].path not in bad]


def _run(inputs, plans, out_dir: Path, opts: Options, hooks: Hooks, *, rank: int, world: int, device: str):
    mine = range(rank, len(inputs), world)
    records, todo = _triage(inputs, plans, mine, opts, out_dir, hooks, rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the earlier records before any journal is appended
    stopped = opts.fail_fast and any(r["status"] == "failed" for r in records.values())
    t0 = t1 = time.time()
    if todo and not stopped:
        created = hooks.make_out_dir()
        try:
            seg = hooks.load(device)
        except BaseException:
            hooks.remove_if_empty(created)
            raise
        journal = _Journal(out_dir / _JOURNAL.format(rank=rank) if opts.manifest else None)
        try:
            for i in sorted(records):
                journal.add(records[i])
            t0 = time.time()
            stopped = _segment_todo(seg, inputs, plans, todo, opts, out_dir, records, journal, rank, world)
            t1 = time.time()
        finally:
            journal.close()
    local = {"records": sorted(records.items()), "span": (t0, t1), "processed": len(todo)}
    if stopped and world > 1:  # --fail-fast: leave at once; torchrun stops the other ranks
        return _outcome([local], len(inputs), rank, world)
    parts = [local]
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, local)
    if rank == 0 and opts.manifest and out_dir.is_dir():
        merged = [rec for part in parts for _, rec in part["records"]]
        order = {str(inp.path.resolve()): n for n, inp in enumerate(inputs)}
        merged.sort(key=lambda r: order.get(r["key"], -1))
        header = _header(parts, opts, len(inputs), world, complete=not stopped)
        _write_manifest(out_dir, header, merged)
    return _outcome(parts, len(inputs), rank, world)


def _outcome(parts: list[dict], total: int, rank: int, world: int) -> Outcome:
    recs = [rec for part in parts for _, rec in part["records"]]
    failures = [(Path(r["input"]), r.get("error", "")) for r in recs if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in recs)
    skipped = sum(r["status"] == "skipped" for r in recs)
    return Outcome(total=total, done=done, skipped=skipped, failures=failures, rank=rank, world=world)


def _header(parts: list[dict], opts: Options, total: int, world: int, *, complete: bool) -> dict:
    from naclip import __version__

    recs = [rec for part in parts for _, rec in part["records"]]
    counts = {s: sum(r["status"] == s for r in recs) for s in ("done", "skipped", "failed")}
    busy = [p["span"] for p in parts if p["processed"]]
    span = max(b for _, b in busy) - min(a for a, _ in busy) if busy else 0.0
    return {
        "naclip_manifest": MANIFEST_VERSION, "naclip_version": __version__, "inputs": total,
        "counts": counts, "complete": complete and sum(counts.values()) == total, "world_size": world,
        "fingerprint": opts.fingerprint, "settings": opts.settings,
        "timing": {"segment_s": round(span, 4),
                   "images_per_s": round(counts["done"] / span, 4) if span > 0 else None},
    }  # fmt: skip


def _segment_todo(seg, inputs, plans, todo, opts: Options, out_dir: Path, records: dict, journal: _Journal,
                  rank: int, world: int) -> bool:  # fmt: skip
    """Segment and write ``todo`` (indices), decoding ahead; one record per input. Returns whether
    ``--fail-fast`` stopped the loop."""
    import contextlib

    from tqdm.auto import tqdm

    from naclip import io

    def load(i: int) -> Any:  # videos are decoded lazily by naclip.video
        path = inputs[i].path
        if is_video(path):
            return None
        return io.load_image(path, max_pixels=opts.max_pixels, exif_orientation=opts.exif_orientation)

    desc = "naclip segment" + (f" (rank 0 of {world})" if world > 1 else "")
    debug = bool(os.environ.get("NACLIP_DEBUG"))
    bar = tqdm(
        total=len(todo), unit="img", desc=desc, disable=not opts.progress or rank != 0, file=sys.stderr
    )
    try:
        with contextlib.closing(prefetch(todo, load, depth=opts.prefetch)) as loaded:
            for i, rgb, err in loaded:
                inp, plan = inputs[i], plans[i]
                outs = expected_outputs(inp.path, plan, frame_masks=opts.frame_masks)
                bar.set_postfix_str(inp.path.name, refresh=False)
                try:
                    if err is not None:
                        raise err
                    _segment_one(seg, inp.path, plan, rgb, opts)
                    records[i] = _record(inp, outs, out_dir, "done", opts.fingerprint)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                    if debug:
                        raise
                    records[i] = _record(inp, outs, out_dir, "failed", opts.fingerprint, _message(exc))
                    _say(f"error: {inp.path}: {_message(exc)}", rank, world)
                journal.add(records[i])
                bar.update(1)
                if opts.fail_fast and records[i]["status"] == "failed":
                    return True
    finally:
        bar.close()
    return False


def _segment_one(seg, path: Path, plan: OutputPaths, rgb: Any, opts: Options) -> None:
    """One input: an image already decoded (``rgb``) or a video (``rgb`` None); every file atomically."""
    protect = (path,)
    plan.mask.parent.mkdir(parents=True, exist_ok=True)
    if rgb is None:
        _segment_video(seg, path, plan, opts, protect)
        return
    result = seg.predict(
        rgb, opts.classes, preset=opts.preset, **opts.predict_kw, probs_path=plan.probs,
        keep_probs=plan.json is not None or plan.heatmaps is not None,  # they read probs
    )  # fmt: skip
    result.save_mask(plan.mask, protect=protect)
    if plan.overlay is not None:
        result.save_overlay(plan.overlay, alpha=opts.alpha, protect=protect)
    if plan.json is not None:
        result.save_json(plan.json, protect=protect)
    if plan.heatmaps is not None:
        result.save_heatmaps(plan.heatmaps, protect=protect)


def _segment_video(seg, path: Path, plan: OutputPaths, opts: Options, protect: tuple) -> None:
    """One video: ``<base>_overlay.mp4``, ``<base>_frames.json`` (last) and with ``--frame-masks`` the
    masks."""
    from tqdm.auto import tqdm

    from naclip import outputs, video

    base = plan.base
    kw = {k: v for k, v in opts.predict_kw.items() if k != "long_side"}
    total = video.probe(path).frames
    with tqdm(total=total, unit="frame", desc=path.name, leave=False, file=sys.stderr,
              disable=not opts.progress) as frames_bar:  # fmt: skip
        report = video.segment_video(
            seg, path, opts.classes, overlay=f"{base}_overlay.mp4", protect=protect,
            masks_dir=f"{base}_masks" if opts.frame_masks else None, batch=opts.batch or video.DEFAULT_BATCH,
            progress=frames_bar.update, preset=opts.preset, **kw,
        )  # fmt: skip
    outputs.save_json(f"{base}_frames.json", report, protect=protect)
