"""Persistent on-disk cache of text-classifier rows (one file per query), shared by processes.

* **Location** (:func:`cache_root`): ``$NACLIP_CACHE_DIR`` when set; set to the empty string it turns the
  cache off. Unset: ``$XDG_CACHE_HOME/naclip`` (``~/.cache/naclip``; ``%LOCALAPPDATA%\\naclip`` on
  Windows). Text features live in ``<root>/text-v1/<context>/``.
* **Key**: the *context* (:class:`TextCacheContext`: model name, SHA-256 of the loaded text weights, tokenizer
  digest, templates, dtype, device type, open_clip version, encoding path) names a folder; the query string
  names a file in it (SHA-256 of the string). Anything that changes the features changes the key.
* **Entries**: ``magic | header length | JSON header {query, dim, sha256} | float32 row``, written with
  :func:`naclip.io.atomic_write` (temporary file + ``os.replace``): two processes filling the same entry both
  write whole files, the last one wins. A file that is truncated, corrupt or for another query is a miss and
  is recomputed and replaced. Failing writes (read-only or full disk) only warn.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CACHE_ENV",
    "DiskTextCache",
    "TextCacheContext",
    "cache_root",
    "encode_queries_cached",
    "tokenizer_digest",
    "weights_digest",
]

CACHE_ENV = "NACLIP_CACHE_DIR"
_LAYOUT = "text-v1"
_MAGIC = b"NACLIPTF"
_HEAD = struct.Struct("<8sI")  # magic, header length
_PROBES = ("a photo of a {c}.", "café, 日本の空, 🙂 Hello-World! 1,2-dichloroethane", "x" * 300)


def cache_root() -> Path | None:
    """The cache folder (see the module docstring); ``None`` when ``NACLIP_CACHE_DIR`` is set but empty."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "naclip"
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "naclip"


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every state-dict tensor that can change text features (names, dtypes, shapes and bytes of
    all entries except the image tower ``visual.*`` and ``logit_scale`` / ``logit_bias``)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
            continue
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Callable[[list[str]], torch.Tensor]) -> str:
    """SHA-256 of the token ids a tokenizer gives for a few probe prompts (vocabulary, casing, context length
    and truncation all show in them), and of its class name."""
    ids = tokenizer([p.format(c="sky") for p in _PROBES])
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TextCacheContext:
    """Everything that changes a query's features except the query itself."""

    model: str
    weights_sha256: str
    tokenizer_sha256: str
    templates: tuple[str, ...]
    dtype: str
    device_type: str
    open_clip: str
    encoding_path: str

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def _encode_entry(query: str, row: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(row, dtype="<f4").tobytes()
    header = json.dumps(
        {"query": query, "dim": int(row.shape[0]), "sha256": hashlib.sha256(payload).hexdigest()}
    ).encode()
    return _HEAD.pack(_MAGIC, len(header)) + header + payload


def _decode_entry(data: bytes, query: str) -> np.ndarray | None:
    """The row stored in ``data`` for ``query``, or ``None`` if the entry is truncated, corrupt or another
    query's."""
    if len(data) < _HEAD.size:
        return None
    magic, n = _HEAD.unpack_from(data)
    if magic != _MAGIC or len(data) < _HEAD.size + n:
        return None
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + n])
        payload = data[_HEAD.size + n :]
        ok = header["query"] == query and len(payload) == 4 * int(header["dim"]) > 0
        ok = ok and hashlib.sha256(payload).hexdigest() == header["sha256"]
    except (ValueError, KeyError, TypeError):
        return None
    return np.frombuffer(payload, dtype="<f4").copy() if ok else None


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _describe(row: dict) -> str:
    c = row["context"]
    if not c:
        return (
            f"  {Path(row['path']).name} (no context.json): {row['entries']} entries, {_size(row['bytes'])}"
        )
    what = (
        f"{c.get('model')} {c.get('dtype')} {c.get('device_type')}, {len(c.get('templates', ()))} templates"
    )
    what += f", {c.get('encoding_path')}, text weights sha256 {str(c.get('weights_sha256'))[:12]}"
    return f"  {what}: {row['entries']} entries, {_size(row['bytes'])}"


class DiskTextCache:
    """Per-query text features under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    @property
    def text_dir(self) -> Path:
        return self.root / _LAYOUT

    def _entry(self, ctx: TextCacheContext, query: str) -> Path:
        name = hashlib.sha256(query.encode("utf-8")).hexdigest()[:40]
        return self.text_dir / ctx.digest() / f"{name}.feat"

    def get(self, ctx: TextCacheContext, queries: Sequence[str]) -> dict[str, torch.Tensor]:
        """The cached rows (float32 ``[D]``) of those ``queries`` that have a valid entry."""
        hits: dict[str, torch.Tensor] = {}
        for q in dict.fromkeys(queries):
            try:
                data = self._entry(ctx, q).read_bytes()
            except OSError:
                continue
            row = _decode_entry(data, q)
            if row is not None:
                hits[q] = torch.from_numpy(row)
        return hits

    def put(self, ctx: TextCacheContext, rows: dict[str, torch.Tensor]) -> None:
        """Store ``rows`` (query -> float ``[D]``) atomically; an OSError only warns."""
        from naclip.io import atomic_write

        folder = self.text_dir / ctx.digest()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            meta = folder / "context.json"
            if not meta.is_file():
                text = json.dumps(asdict(ctx), indent=1, ensure_ascii=False).encode()
                atomic_write(meta, lambda f: f.write(text))
            for q, row in rows.items():
                data = _encode_entry(q, row.detach().float().cpu().numpy())
                atomic_write(self._entry(ctx, q), lambda f, d=data: f.write(d))
        except OSError as exc:
            warnings.warn(f"naclip text cache: cannot write to {str(folder)!r}: {exc}", stacklevel=3)

    def info(self) -> list[dict]:
        """One dict per context folder: ``context`` (its ``context.json`` or ``None``), ``entries``, ``bytes``
        (``.feat`` files and everything else in the folder), ``path``."""
        out = []
        if not self.text_dir.is_dir():
            return out
        for folder in sorted(p for p in self.text_dir.iterdir() if p.is_dir()):
            files = [p for p in folder.iterdir() if p.is_file()]
            try:
                ctx = json.loads((folder / "context.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                ctx = None
            out.append(
                {
                    "path": str(folder),
                    "context": ctx,
                    "entries": sum(p.suffix == ".feat" for p in files),
                    "bytes": sum(p.stat().st_size for p in files),
                }
            )
        return out

    def clear(self) -> tuple[int, int]:
        """Delete the text cache folder; returns ``(entries, bytes)`` removed."""
        rows = self.info()
        if self.text_dir.is_dir():
            shutil.rmtree(self.text_dir)
        return sum(r["entries"] for r in rows), sum(r["bytes"] for r in rows)

    def info_report(self) -> list[str]:
        """Lines for ``naclip cache info``: location, totals, one line per context."""
        rows = self.info()
        total, size = sum(r["entries"] for r in rows), sum(r["bytes"] for r in rows)
        head = f"naclip cache: {self.root}" + (f" (from ${CACHE_ENV})" if os.environ.get(CACHE_ENV) else "")
        lines = [head, f"text features: {total} entries, {_size(size)} in {len(rows)} contexts"]
        return lines + [_describe(r) for r in rows]

    def clear_report(self) -> list[str]:
        """Clear the cache; the line ``naclip cache clear`` prints."""
        n, size = self.clear()
        return [f"naclip cache: removed {n} text-feature entries ({_size(size)}) from {self.text_dir}"]


def encode_queries_cached(
    cache: DiskTextCache,
    ctx: TextCacheContext,
    encode: Callable[[list[str], Callable[[int, int], None] | None], torch.Tensor],
    queries: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Rows of ``queries`` (float32 ``[Q, D]``, CPU): cached ones read, the others computed with
    ``encode(missing, progress)`` and stored."""
    hits = cache.get(ctx, queries)
    missing = [q for q in dict.fromkeys(queries) if q not in hits]
    if missing:
        fresh = encode(missing, progress)
        rows = dict(zip(missing, fresh.float().cpu(), strict=True))
        cache.put(ctx, rows)
        hits.update(rows)
    return torch.stack([hits[q] for q in queries])
