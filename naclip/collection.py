"""Large collections for ``naclip segment``: the input list (files, folders, ``--recursive``, glob patterns),
the mirrored output tree, ``--skip-existing``, the manifest, decoding ahead of the model and the torchrun
share of each rank.

Contract (design and manifest format: ``docs/collections.md``):

* **Inputs**: each argument in the order given; a folder gives its image files (suffixes Pillow can open,
  :data:`IMAGE_SUFFIXES`), sorted by relative path, subfolders too with ``--recursive``; a pattern with
  ``* ? [`` is expanded by us (``**`` spans folders with ``--recursive``); duplicates keep their first place.
* **Outputs** mirror the input tree: ``<out>/<path relative to the folder or pattern root>/<stem>_mask.png``;
  explicit files land in ``<out>`` itself; names that meet in one output folder get ``<stem>_<ext>[_<n>]``.
* **Ranks**: input ``i`` of the full sorted list belongs to rank ``i % world``; each rank reads, checks and
  segments only its share; rank 0 writes the merged manifest after an ``all_gather``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "CollectionError",
    "Hooks",
    "Input",
    "Options",
    "Outcome",
    "OutputPaths",
    "add_collection_args",
    "collect_inputs",
    "expected_outputs",
    "plan_outputs",
    "prefetch",
    "read_records",
    "run_collection",
    "settings_fingerprint",
]

#: The merged manifest in ``--out`` (JSON Lines: one header line, then one line per input, in input order).
MANIFEST_NAME = "manifest.jsonl"
#: Per-rank journal, appended line by line while a run goes (what an interrupted run leaves to audit).
_JOURNAL = ".manifest.rank{rank}.jsonl"
MANIFEST_VERSION = 1
#: Decoded images waiting for the model by default (``--prefetch``).
DEFAULT_PREFETCH = 4
# Pillow formats that register a suffix but cannot decode pixels without external tools / handlers.
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "EPS", "MPEG", "WMF"}
_OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png", "_probs.npy", "_heatmaps.png")
_MAGIC = ("*", "?", "[")


def _pil_suffixes() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    ok = {fmt for fmt in Image.OPEN if fmt not in _UNDECODABLE}
    return tuple(sorted(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in ok))


#: File suffixes picked up in folders and by patterns: every suffix Pillow can open (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = _pil_suffixes()


class CollectionError(ValueError):
    """A bad input list or output plan (missing path, empty match, an output that is an input)."""


def _video_suffixes() -> tuple[str, ...]:
    from naclip.video import VIDEO_SUFFIXES

    return VIDEO_SUFFIXES


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in _video_suffixes()


# --------------------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Input:
    """One input: ``path`` as found, ``rel`` its output location below ``--out`` (folders + stem, no
    suffix)."""

    path: Path
    rel: Path


def _under(path: Path, root: Path | None) -> bool:
    return root is not None and (path == root or root in path.parents)


def _scan(root: Path, *, recursive: bool, out_dir: Path | None) -> list[Path]:
    """Image files of ``root`` (and its subfolders with ``recursive``), sorted by their relative path parts;
    files under ``out_dir`` named like outputs are left out (a rerun into the input tree)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if not recursive:
            dirnames.clear()
        here = Path(dirpath)
        in_out = _under(here.resolve(), out_dir)
        for name in filenames:
            f = here / name
            skip = in_out and name.endswith(_OUTPUT_SUFFIXES)
            if f.suffix.lower() in IMAGE_SUFFIXES and not skip and f.is_file():
                found.append(f)
    return sorted(found, key=lambda f: f.relative_to(root).parts)


def _pattern_root(pattern: str) -> Path:
    """The leading folders of ``pattern`` without wildcards (what the outputs are mirrored relative to)."""
    parts = Path(pattern).parts
    keep = []
    for part in parts[:-1]:
        if any(m in part for m in _MAGIC):
            break
        keep.append(part)
    return Path(*keep) if keep else Path(".")


def _expand(item: str, *, recursive: bool, out_dir: Path | None) -> list[Input]:
    p = Path(item)
    if p.is_dir():
        files = _scan(p, recursive=recursive, out_dir=out_dir)
        if not files:
            sub = " or its subfolders" if recursive else " (add --recursive for subfolders)"
            raise CollectionError(f"directory {item!r}{sub} contains no image files Pillow can open")
        return [Input(f, f.relative_to(p).with_name(f.stem)) for f in files]
    if p.exists():
        return [Input(p, Path(p.stem))]
    if not any(m in item for m in _MAGIC):
        raise CollectionError(f"input {item!r} does not exist")
    if "**" in item and not recursive:
        raise CollectionError(f"pattern {item!r}: ** spans folders only with --recursive (add it, or use *)")
    root = _pattern_root(item)
    suffixes = (*IMAGE_SUFFIXES, *_video_suffixes())
    out: list[Input] = []
    for match in sorted(glob.glob(item, recursive=recursive)):
        m = Path(match)
        if m.is_dir():
            out += [
                Input(f, f.relative_to(root).with_name(f.stem))
                for f in _scan(m, recursive=False, out_dir=out_dir)
            ]
        elif m.suffix.lower() in suffixes and not (
            _under(m.resolve(), out_dir) and m.name.endswith(_OUTPUT_SUFFIXES)
        ):
            out.append(Input(m, m.relative_to(root).with_name(m.stem)))
    if not out:
        raise CollectionError(f"pattern {item!r} matches no image or video file")
    return out


def collect_inputs(
    items: Sequence[str], *, recursive: bool = False, out_dir: Path | None = None
) -> list[Input]:
    """Expand files, folders and glob patterns into the ordered, de-duplicated :class:`Input` list (see the
    module docstring). ``CollectionError`` for a missing path or a folder / pattern without images.
    Explicit files are kept whatever their suffix (an unreadable one fails when it is processed)."""
    skip = out_dir.resolve() if out_dir is not None else None
    out: list[Input] = []
    seen: set[Path] = set()
    for item in items:
        for inp in _expand(str(item), recursive=recursive, out_dir=skip):
            key = inp.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(inp)
    return out


# -------------------------------------------------------------------------------------------- the outputs


@dataclass(frozen=True)
class OutputPaths:
    """The files of one image input (``None``: not requested). A video input uses ``mask``'s folder and
    base name for ``<base>_overlay.mp4``, ``<base>_frames.json`` and ``<base>_masks/``."""

    mask: Path
    overlay: Path | None
    probs: Path | None
    json: Path | None = None
    heatmaps: Path | None = None

    @property
    def base(self) -> Path:
        return self.mask.with_name(self.mask.name.removesuffix("_mask.png"))


def _output_names(inputs: Sequence[Input]) -> list[Path]:
    """``rel`` of each input, made unique per output folder: a stem shared by several inputs of one folder
    becomes ``<stem>_<ext>``, a name still taken gets ``_<n>`` (n = 2, 3, ..., in input order)."""
    counts: dict[Path, int] = {}
    for inp in inputs:
        counts[inp.rel] = counts.get(inp.rel, 0) + 1
    used: set[Path] = set()
    names = []
    for inp in inputs:
        base = inp.rel
        if counts[base] > 1:
            base = base.with_name(f"{base.name}_{inp.path.suffix.lstrip('.').lower() or 'noext'}")
        name, n = base, 1
        while name in used:
            n += 1
            name = base.with_name(f"{base.name}_{n}")
        used.add(name)
        names.append(name)
    return names


def plan_outputs(
    inputs: Sequence[Input], out_dir: Path, *, overlay: bool, probs: bool, json: bool = False,
    heatmaps: bool = False,
) -> list[OutputPaths]:  # fmt: skip
    """The output paths of each input (see :func:`_output_names` for the naming rule); ``CollectionError``
    when an output path is one of the inputs (inputs are never overwritten)."""
    plans = []
    for name in _output_names(inputs):
        base = out_dir / name
        plans.append(
            OutputPaths(
                mask=base.with_name(f"{base.name}_mask.png"),
                overlay=base.with_name(f"{base.name}_overlay.png") if overlay else None,
                probs=base.with_name(f"{base.name}_probs.npy") if probs else None,
                json=base.with_name(f"{base.name}.json") if json else None,
                heatmaps=base.with_name(f"{base.name}_heatmaps.png") if heatmaps else None,
            )
        )
    input_keys = {inp.path.resolve() for inp in inputs}
    for plan in plans:
        for target in (plan.mask, plan.overlay, plan.probs, plan.json, plan.heatmaps):
            if target is not None and target.resolve() in input_keys:
                raise CollectionError(
                    f"output {str(target)!r} would overwrite an input; choose another --out directory"
                )
    return plans


def expected_outputs(path: Path, plan: OutputPaths, *, frame_masks: bool = False) -> list[Path]:
    """Every file (and, for a video's frame masks, folder) the input ``path`` produces: an image's requested
    kinds; a video's overlay, masks folder and per-frame JSON (written last)."""
    if _is_video(path):
        base = plan.base
        extra = [base.with_name(f"{base.name}_masks")] if frame_masks else []
        return [
            base.with_name(f"{base.name}_overlay.mp4"),
            *extra,
            base.with_name(f"{base.name}_frames.json"),
        ]
    return [p for p in (plan.probs, plan.mask, plan.overlay, plan.json, plan.heatmaps) if p is not None]


def _complete(paths: Sequence[Path]) -> bool:
    """All outputs exist: non-empty regular files (or a folder for frame masks). Every writer goes through
    :func:`naclip.io.atomic_write`, so a file under its final name is whole."""
    for p in paths:
        if not (p.is_dir() if p.name.endswith("_masks") else p.is_file() and p.stat().st_size > 0):
            return False
    return True


# ------------------------------------------------------------------------------------- settings, manifest

#: ``argparse`` attributes that change what an input's outputs contain (the settings fingerprint).
_FINGERPRINT_ARGS = (
    "model", "pretrained", "checkpoint", "method", "gaussian_std", "dtype", "preset", "mode", "pamr",
    "prob_thd", "short_side", "long_side", "crop", "stride", "alpha", "exif_orientation",
)  # fmt: skip


def settings_fingerprint(
    args: argparse.Namespace, classes: Any, templates: Sequence[str]
) -> tuple[str, dict]:
    """``(sha256 hex[:16], settings)``: the settings that change the outputs (model, weights file size,
    method, inference settings, classes with their synonyms, prompt templates, overlay opacity)."""
    settings = {k: getattr(args, k, None) for k in _FINGERPRINT_ARGS}
    ckpt = settings["checkpoint"]
    settings["checkpoint_bytes"] = Path(ckpt).stat().st_size if ckpt and Path(ckpt).is_file() else None
    settings["classes"] = [list(s) for s in classes.synonyms]
    settings["class_names"] = list(classes.names)
    settings["templates"] = list(templates)
    text = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], settings


def _read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one a line; a torn last line (a killed run) and foreign lines are
    skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("input"), str):
            out.append(rec)
    return out


def read_records(out_dir: Path) -> dict[str, dict]:
    """The latest record of each input (key: its resolved path) from ``<out>/manifest.jsonl`` and the
    journals an interrupted run left (these are newer, so they win)."""
    recs: dict[str, dict] = {}
    paths = [out_dir / MANIFEST_NAME, *sorted(out_dir.glob(_JOURNAL.format(rank="*")))]
    for path in paths:
        for rec in _read_jsonl(path):
            recs[rec.get("key", rec["input"])] = rec
    return recs


def _record(inp: Input, outputs: Sequence[Path], out_dir: Path, status: str, fingerprint: str | None,
            error: str | None = None) -> dict:  # fmt: skip
    rec = {
        "input": str(inp.path),
        "key": str(inp.path.resolve()),
        "outputs": [p.relative_to(out_dir).as_posix() for p in outputs],
        "status": status,
        "fingerprint": fingerprint,
    }
    if error is not None:
        rec["error"] = error
    return rec


class _Journal:
    """Appends records to this rank's journal, one flushed line each (opened on the first record)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self._f = path, None

    def add(self, rec: dict) -> None:
        if self.path is None:
            return
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _write_manifest(out_dir: Path, header: dict, records: Sequence[dict]) -> None:
    from naclip.io import atomic_write

    lines = [json.dumps(header, ensure_ascii=False)] + [json.dumps(r, ensure_ascii=False) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    atomic_write(out_dir / MANIFEST_NAME, lambda f: f.write(data))
    for journal in out_dir.glob(_JOURNAL.format(rank="*")):  # this run's and any older run's: merged now
        journal.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------- decoding ahead

_END = object()


def prefetch(
    items: Sequence[Any], load: Callable[[Any], Any], *, depth: int
) -> Iterator[tuple[Any, Any, Exception | None]]:
    """``(item, load(item), None)`` or ``(item, None, error)`` for each item in order, ``load`` running in a
    background thread at most ``depth`` items ahead (so at most ``depth + 2`` loaded values are alive: the
    queue, the one being loaded, the one in use). ``depth=0`` loads in the calling thread. Closing the
    iterator early stops the thread."""
    if depth == 0:
        for it in items:
            yield _load_one(it, load)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: Any) -> None:
        while not stop.is_set():
            try:
                q.put(value, timeout=0.05)
                return
            except queue.Full:
                continue

    def work() -> None:
        for it in items:
            if stop.is_set():
                return
            put(_load_one(it, load))
        put(_END)

    thread = threading.Thread(target=work, name="naclip-decode", daemon=True)
    thread.start()
    try:
        while (got := q.get()) is not _END:
            yield got
    finally:
        stop.set()
        thread.join()


def _load_one(item: Any, load: Callable[[Any], Any]) -> tuple[Any, Any, Exception | None]:
    try:
        return item, load(item), None
    except Exception as exc:  # noqa: BLE001 - reported for this item, the others go on
        return item, None, exc


# ---------------------------------------------------------------------------------------------- the run


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
        if _is_video(path):
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


# ------------------------------------------------------------------------------------------- arguments


def add_collection_args(p: argparse.ArgumentParser, *, count_type: Callable[[str], int] = int) -> None:
    """The collection options of ``naclip segment``: ``--recursive``, ``--skip-existing``,
    ``--manifest/--no-manifest``, ``--fail-fast``, ``--prefetch N`` (``count_type``: the CLI's
    non-negative int parser)."""
    p.add_argument(
        "--recursive",
        action="store_true",
        help="also take images from subfolders of a folder input, and let ** in a quoted pattern span "
        "folders. Outputs mirror the input tree: <out>/<path below the folder or pattern root>/"
        "<stem>_mask.png; explicit files go to <out>; names meeting in one output folder get "
        "<stem>_<ext>[_<n>]",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip an input whose requested outputs all exist (written atomically, so they are whole) unless "
        f"<out>/{MANIFEST_NAME} records them with other settings; rerun an interrupted run with it to resume",
    )
    p.add_argument(
        "--manifest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write <out>/{MANIFEST_NAME}: per input its outputs, status (done / skipped / failed with the "
        "error) and settings fingerprint (default on)",
    )
    p.add_argument(
        "--fail-fast", action="store_true", help="stop at the first input that fails (default: go on, exit 1)"
    )
    p.add_argument(
        "--prefetch",
        type=count_type,
        default=DEFAULT_PREFETCH,
        metavar="N",
        help=f"images decoded ahead of the model in a background thread (default {DEFAULT_PREFETCH}; "
        "0 = decode in turn)",
    )
