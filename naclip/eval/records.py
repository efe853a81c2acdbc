"""Append-only, fsynced log of per-image joint histograms: what makes ``naclip eval`` resumable.

One log file per writer (rank). Layout (little-endian)::

    header : b"NACLIPEV" | u32 version (=1) | u32 n | n bytes fingerprint (UTF-8 JSON) | u32 crc32(all before)
    record : u32 MAGIC (0x31434552, b"REC1") | u32 image index | u32 k | u32 crc32(index, k, payload)
             | payload: k x u16 flat cell (g·256 + p) | k x i64 pixel count   (the non-zero cells of the
               image's [256, 256] joint histogram, see naclip.eval.metrics.joint_histogram)

A record is written with one ``write`` call, then flushed and ``os.fsync``-ed before the next image starts, so
a run killed at any moment leaves at most one incomplete (torn) record at the end of a file. Reading stops at
the first record that is short, has a bad magic or a bad checksum; everything from there on is discarded (the
owner truncates its own file to the last good record before appending again). Every record's histogram is
exact integer data, so the dataset histogram rebuilt from the logs is bit-identical to an uninterrupted run's,
whatever the order in which images were finished or how many times the run was resumed.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from naclip.eval.metrics import HIST_SIZE
from naclip.io import atomic_write

__all__ = ["LogState", "RecordLog", "encode_record", "read_log", "read_logs", "records_to_hist"]

_FILE_MAGIC = b"NACLIPEV"
_VERSION = 1
_REC_MAGIC = 0x31434552
_REC_HEAD = struct.Struct("<IIII")
_FILE_HEAD = struct.Struct("<8sII")


def _fingerprint_bytes(fingerprint: dict) -> bytes:
    return json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_record(index: int, hist: torch.Tensor) -> bytes:
    """Bytes of one record for image ``index`` with histogram ``hist`` (``[256, 256]`` integer)."""
    flat = hist.reshape(-1).cpu().numpy().astype(np.int64, copy=False)
    cells = np.flatnonzero(flat).astype("<u2")
    counts = flat[cells.astype(np.int64)].astype("<i8")
    payload = cells.tobytes() + counts.tobytes()
    crc = zlib.crc32(struct.pack("<II", index, len(cells)) + payload)
    return _REC_HEAD.pack(_REC_MAGIC, index, len(cells), crc) + payload


@dataclass
class LogState:
    """Contents of one log: the fingerprint, the records (image index -> sparse histogram), and where the last
    good record ends (``good_bytes``; ``file_bytes`` > ``good_bytes`` means a torn or corrupt tail)."""

    fingerprint: dict | None
    records: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    good_bytes: int = 0
    file_bytes: int = 0
    duplicates: int = 0


def read_log(path: str | os.PathLike) -> LogState:
    """Parse one log file (see module docstring); never raises on a torn tail, only on a foreign file."""
    path = Path(path)
    data = path.read_bytes()
    state = LogState(fingerprint=None, file_bytes=len(data))
    if len(data) < _FILE_HEAD.size:
        return state  # torn header: nothing committed
    magic, version, n = _FILE_HEAD.unpack_from(data, 0)
    if magic != _FILE_MAGIC:
        raise ValueError(f"{path} is not a naclip eval progress log (bad magic {magic!r})")
    if version != _VERSION:
        raise ValueError(f"{path} has log version {version}; this naclip reads version {_VERSION}")
    end = _FILE_HEAD.size + n
    if len(data) < end + 4:
        return state
    (crc,) = struct.unpack_from("<I", data, end)
    if crc != zlib.crc32(data[:end]):
        return state
    state.fingerprint = json.loads(data[_FILE_HEAD.size : end].decode("utf-8"))
    pos = end + 4
    state.good_bytes = pos
    while pos + _REC_HEAD.size <= len(data):
        magic, index, k, crc = _REC_HEAD.unpack_from(data, pos)
        body = pos + _REC_HEAD.size
        stop = body + k * 10
        if magic != _REC_MAGIC or stop > len(data):
            break
        payload = data[body:stop]
        if zlib.crc32(struct.pack("<II", index, k) + payload) != crc:
            break
        if index in state.records:
            state.duplicates += 1
        else:
            cells = np.frombuffer(payload, dtype="<u2", count=k).astype(np.int64)
            counts = np.frombuffer(payload, dtype="<i8", count=k, offset=2 * k).astype(np.int64)
            state.records[index] = (cells, counts)
        pos = stop
        state.good_bytes = pos
    return state


def read_logs(paths: list[Path], fingerprint: dict) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Merge the records of several logs (first occurrence of an index wins; there are none twice unless a log
    was copied by hand). Raises ValueError if a log was written for another configuration.

    Returns ``(records, torn_bytes)`` where ``torn_bytes`` counts discarded tail bytes over all files.
    """
    merged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    torn = 0
    for p in sorted(paths):
        st = read_log(p)
        torn += st.file_bytes - st.good_bytes
        if st.fingerprint is None:
            continue
        if st.fingerprint != fingerprint:
            diff = sorted(
                k
                for k in set(st.fingerprint) | set(fingerprint)
                if st.fingerprint.get(k) != fingerprint.get(k)
            )
            raise ValueError(
                f"progress log {p} belongs to a different run (differs in: {', '.join(diff)}); "
                f"use another --out folder, or delete {p.parent} to start over"
            )
        for idx, rec in st.records.items():
            merged.setdefault(idx, rec)
    return merged, torn


def records_to_hist(records: dict[int, tuple[np.ndarray, np.ndarray]], indices=None) -> torch.Tensor:
    """Sum the sparse histograms of ``records`` (only ``indices`` when given) -> ``[256, 256]`` int64."""
    flat = np.zeros(HIST_SIZE * HIST_SIZE, dtype=np.int64)
    keys = records.keys() if indices is None else (i for i in indices if i in records)
    for i in keys:
        cells, counts = records[i]
        np.add.at(flat, cells, counts)
    return torch.from_numpy(flat.reshape(HIST_SIZE, HIST_SIZE))


class RecordLog:
    """Writer for one log file. Opening an existing file checks its fingerprint and truncates a torn tail;
    a new file gets its header written atomically (:func:`naclip.io.atomic_write`) and the folder fsynced.
    Records are then appended in place (``append``): an append-only log, not an atomic rewrite."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = read_log(self.path) if self.path.exists() else None
        if state is None or state.fingerprint is None:
            fp = _fingerprint_bytes(fingerprint)
            head = _FILE_HEAD.pack(_FILE_MAGIC, _VERSION, len(fp)) + fp
            head += struct.pack("<I", zlib.crc32(head))
            atomic_write(self.path, lambda f: f.write(head))  # temp file, fsync, os.replace
            _fsync_dir(self.path.parent)  # make the new directory entry durable before records follow
        else:
            if state.fingerprint != fingerprint:
                read_logs([self.path], fingerprint)  # raises with the differing keys
            if state.good_bytes < state.file_bytes:
                os.truncate(self.path, state.good_bytes)
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the run, closed in close()

    def append(self, index: int, hist: torch.Tensor) -> None:
        """Append image ``index``'s histogram and fsync before returning."""
        self._f.write(encode_record(index, hist))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
