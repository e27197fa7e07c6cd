"""`RequestGate`: one model serves one request at a time. Requests queue on its lock in arrival
order; `close` cancels the running one (its next event unwinds it) and waits for it to end."""

from __future__ import annotations

import threading
from collections.abc import Callable

from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.types import Event


class Cancelled(EdgeMetastoneError):
    """Raised inside a generation whose consumer stopped listening, or whose model closed."""


class RequestGate:
    """The lock requests queue on, and the closing flag every running generation watches."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # one generation (or calibration) at a time per model
        self._closing = threading.Event()

    def check_open(self) -> None:
        """A clear error once the model is closed."""
        if self._closing.is_set():
            raise EdgeMetastoneError("the reasoner is closed")

    def hook(self, on_event: Callable[[Event], None] | None) -> Callable[[Event], None]:
        """`on_event` behind a check that unwinds the generation once `close` is called."""

        def hook(ev: Event) -> None:
            if self._closing.is_set():
                raise Cancelled("the reasoner was closed during the request")
            if on_event is not None:
                on_event(ev)

        return hook

    def close(self, free: Callable[[], None]) -> None:
        """Cancel the running generation, wait for it to unwind, then `free` the model."""
        self._closing.set()
        with self.lock:
            free()
