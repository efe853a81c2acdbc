"""Decoding ahead of the model: :func:`prefetch` runs a loader in a background thread.

Contract: items come back in their order as ``(item, value, None)`` or ``(item, None, error)`` (a failing
load is reported for that item; the others go on); at most ``depth`` loaded values wait in the queue
(``depth + 2`` alive in all); ``depth=0`` loads in the calling thread; closing the iterator stops the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: Decoded images waiting for the model by default (``--prefetch``).
DEFAULT_PREFETCH = 4

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
