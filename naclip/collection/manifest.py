"""The record of a collection run in ``--out``: the settings fingerprint, each rank's journal and the
merged manifest (format: ``docs/collections.md``).

Contract: a rank appends one flushed JSON line per input to ``.manifest.rank<r>.jsonl`` while it runs
(:class:`_Journal`); rank 0 then writes ``manifest.jsonl`` atomically (one header line, then one record per
input in input order) and removes the journals. :func:`read_records` returns the latest record of each input
from both, skipping torn or foreign lines, so a killed run can be resumed and audited.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from naclip.collection.inputs import Input

#: The merged manifest in ``--out`` (JSON Lines: one header line, then one line per input, in input order).
MANIFEST_NAME = "manifest.jsonl"
#: Per-rank journal, appended line by line while a run goes (what an interrupted run leaves to audit).
_JOURNAL = ".manifest.rank{rank}.jsonl"
MANIFEST_VERSION = 1

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
