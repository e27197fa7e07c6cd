"""The stream bridge: run a callback-style request in a worker thread and hand its events, then its
result, to the caller's thread as an iterator. When the caller stops iterating, the worker's next
event raises `Cancelled`, which unwinds the generation; when the model is closed under a caller
still listening, the iterator raises that `Cancelled` ("closed") instead of waiting forever."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from edge_metastone.gate import Cancelled
from edge_metastone.types import Event

R = TypeVar("R")


def stream(run: Callable[[Callable[[Event], None]], R]) -> Iterator[Event | R]:
    """Yield the events `run(on_event)` reports as they happen, then what it returns; an error in
    `run` is raised here, in the caller's thread."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancelled = threading.Event()

    def forward(ev: Event) -> None:
        if cancelled.is_set():  # the consumer went away: unwind the generation
            raise Cancelled
        q.put(("event", ev))

    def work() -> None:
        try:
            q.put(("result", run(forward)))
        except Cancelled as e:
            if not cancelled.is_set():  # the model closed under a listening consumer: tell it
                q.put(("error", e))
        except BaseException as e:  # re-raised in the caller's thread
            q.put(("error", e))

    threading.Thread(target=work, daemon=True, name="edge-metastone-reason").start()
    try:
        while True:
            kind, item = q.get()
            if kind == "error":
                raise item
            yield item
            if kind == "result":
                return
    finally:
        cancelled.set()
