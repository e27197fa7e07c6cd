"""`RequestGate`: one model serves one request at a time. Requests queue on its lock in arrival
order; `close` cancels the running one (its next event unwinds it) and waits for it to end."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.types import Event


class Cancelled(EdgeMetastoneError):
    """Raised inside a generation whose consumer stopped listening, or whose model closed."""


class RequestGate:
    """The lock requests queue on, and the closing flag every running generation watches."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # one generation (or calibration) at a time per model
        self._closing = threading.Event()
        self._free_later: Callable[[], None] | None = None  # a close from inside a request

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The lock, for one request; a `close` called from inside it (an `on_event` callback)
        frees the model once the request has unwound."""
        try:
            with self.lock:
                yield
        finally:
            self._free_pending()

    def _free_pending(self) -> None:
        """Run a `close` deferred by `held`, once this thread holds the lock no more."""
        if self._free_later is not None and not self.lock._is_owned():  # type: ignore[attr-defined]
            with self.lock:
                free, self._free_later = self._free_later, None
                if free is not None:
                    free()

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
        """Cancel the running generation, wait for it to unwind, then `free` the model. Called
        from inside the running request (its `on_event` callback, on this thread), it cannot wait:
        the request's next event unwinds it, and the model is freed as it lets go of the lock."""
        self._closing.set()
        if self.lock._is_owned():  # type: ignore[attr-defined]
            self._free_later = free
            return
        with self.lock:
            free()
