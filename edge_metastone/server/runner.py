"""uvicorn's server with a drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import uvicorn

from edge_metastone.server.service import GenerationService

FLUSH_S = 1.0  # on a forced exit, time for cancelled requests to send their 503


class DrainingServer(uvicorn.Server):
    """On the first Ctrl-C/SIGTERM: stop accepting, give requests in flight (running and queued)
    `grace` seconds, then cancel the rest (they get a 503). A second Ctrl-C cancels at once. The
    signal is not re-raised afterwards: the command ends normally."""

    def __init__(self, config: uvicorn.Config, service: GenerationService, grace: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace = grace

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install uvicorn's handlers for SIGINT/SIGTERM and restore the old ones after."""
        if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with the requests still in flight cancelled after the grace time."""
        drain = asyncio.ensure_future(self._cancel_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()
        if self.force_exit:  # uvicorn skips the app's shutdown then; ours cancels and joins
            self.service.stop()
            loop = asyncio.get_running_loop()
            end = loop.time() + FLUSH_S
            while self.server_state.tasks and loop.time() < end:  # cancelled requests say so
                await asyncio.sleep(0.02)
            await self.lifespan.shutdown()

    async def _cancel_after_grace(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.grace
        while not self.force_exit and loop.time() < end:
            await asyncio.sleep(0.05)
        self.service.stop()
