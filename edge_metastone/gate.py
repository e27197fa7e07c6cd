"""`RequestGate`: many requests share one model at a time; the calibration has it alone.

Requests hold the gate shared (`shared`): they run together, batched by the runtime. The
calibration measures the machine, so it holds the gate alone (`exclusive`): it waits for the
running requests to end, and requests that arrive meanwhile wait behind it. `close` cancels the
running requests (each one's next event unwinds it) and frees the model once the last has let go.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from edge_metastone.errors import EdgeMetastoneError, RequestCancelledError
from edge_metastone.types import Event

# Raised inside a generation whose consumer stopped listening, or whose model closed.
Cancelled = RequestCancelledError


class RequestGate:
    """Shared holds for requests, an exclusive one for the calibration, and the closing flag
    every running generation watches."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0  # holds by running requests
        self._writer: int | None = None  # the thread holding the gate alone
        self._depth = 0  # its nested exclusive holds
        self._writers_waiting = 0
        self._mine = threading.local()  # this thread's shared holds
        self._closing = threading.Event()
        self._free_later: Callable[[], None] | None = None  # a close from inside a request

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the gate beside other requests (waits while the calibration runs or waits)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and not self._held_shared():
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._shared += 1
            self._mine.n = getattr(self._mine, "n", 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._mine.n -= 1
                self._cond.notify_all()
            self._free_pending()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the gate alone (waits for the running requests to end). A thread inside a shared
        hold cannot wait for itself: it gets a clear error instead of a deadlock."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                if self._held_shared():
                    raise EdgeMetastoneError("the model is busy with this thread's own request")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._shared:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                self._cond.notify_all()
            self._free_pending()

    def _held_shared(self) -> bool:
        return getattr(self._mine, "n", 0) > 0

    def _idle(self) -> bool:
        return self._shared == 0 and self._writer is None

    def _free_pending(self) -> None:
        """Run a `close` deferred because it was called from inside a request, once the last
        request has let go."""
        with self._cond:
            if self._free_later is None or not self._idle():
                return
            free, self._free_later = self._free_later, None
        free()

    @property
    def closing(self) -> bool:
        """True once `close` was called."""
        return self._closing.is_set()

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
        """Cancel the running generations, wait for them to unwind, then `free` the model.
        Called from inside a running request (its `on_event` callback, on its thread), it cannot
        wait: each request's next event unwinds it, and the model is freed as the last lets go."""
        self._closing.set()
        with self._cond:
            if self._held_shared() or self._writer == threading.get_ident():
                self._free_later = free
                return
            while not self._idle():
                self._cond.wait()
        free()
