"""Server-sent events for a streaming request, and waiting on a request while watching its client.

A stream is OpenAI's chunk sequence: a first chunk with the assistant role; progress chunks whose
`metastone.events` carry every candidate's tokens, scored steps and finishes as they happen (their
`delta` is empty: the answer is not known until the candidates are compared); then the chosen
answer as the content delta with `metastone.result`, the finish chunk, the usage chunk when
`stream_options.include_usage` asks for it, and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from edge_metastone.server.errors import ApiError, from_exception, shutting_down
from edge_metastone.server.schema import (
    Completion,
    event_json,
    extension,
    finish_reason,
    ranked,
    usage,
)
from edge_metastone.server.service import Cancel, GenerationService, Job

logger = logging.getLogger(__name__)

T = TypeVar("T")


def sse(obj: Any) -> bytes:
    """One `data:` event."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, allow_nan=False).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
FLUSH_S = 0.02  # progress chunks at most every 20 ms: one chunk carries many tokens


async def _disconnected(receive: Receive) -> None:
    """Return when the client closes the connection (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def watch_client(
    awaitable: Awaitable[T], receive: Receive, service: GenerationService, job: Job
) -> T:
    """Await `awaitable`; if the client disconnects first, cancel the job (the awaitable then
    sees the cancellation on the job's channel)."""
    watcher = asyncio.ensure_future(_disconnected(receive))
    watcher.add_done_callback(
        lambda t: None if t.cancelled() else service.cancel(job, Cancel.CLIENT)
    )
    try:
        return await awaitable
    finally:
        watcher.cancel()


def error_of(kind: str, item: Any, job: Job, service: GenerationService) -> ApiError:
    """The API error for a ("error", e) or ("cancelled", why) channel item."""
    if kind == "cancelled":
        if item is Cancel.SHUTDOWN:
            return shutting_down()
        return ApiError(499, "the client closed the request", code="client_closed")
    return from_exception(item, queued=job.ahead > 0, closing=service.closing)


class EventStream(Response):
    """A response that sends a job's stream, watching for the client's disconnect itself
    (uvicorn drops writes to a closed connection silently, so a writer alone never notices)."""

    def __init__(
        self,
        service: GenerationService,
        job: Job,
        first: list[tuple[str, Any]],
        completion: Completion,
        include_usage: bool,
    ) -> None:
        self.service = service
        self.job = job
        self.first = first
        self.completion = completion
        self.include_usage = include_usage
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        body = self._body()
        try:
            await watch_client(self._send_all(body, send), receive, self.service, self.job)
        finally:
            await body.aclose()
            self.service.cancel(self.job, Cancel.CLIENT)  # a no-op once the job is done

    async def _send_all(self, body: AsyncIterator[bytes], send: Send) -> None:
        async for data in body:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _body(self) -> AsyncIterator[bytes]:
        c = self.completion
        yield sse(c.chunk({"role": "assistant", "content": ""}))
        items = self.first
        while True:
            events = [event_json(ev) for kind, ev in items if kind == "event"]
            if events:
                yield sse(c.chunk(metastone={"events": events}))
            for kind, item in items:
                if kind == "result":
                    seed = self.job.options.seed
                    yield sse(
                        c.chunk(
                            {"content": item.answer},
                            metastone={
                                "events": [],
                                "result": extension(item, seed, capped=self.job.capped),
                            },
                        )
                    )
                    yield sse(c.chunk(finish=finish_reason(item)))
                    for i, cand in enumerate(ranked(item, c.n)[1:], start=1):
                        yield sse(c.chunk({"role": "assistant", "content": cand.answer}, index=i))
                        finish = "length" if cand.truncated else "stop"
                        yield sse(c.chunk(finish=finish, index=i))
                    if self.include_usage:
                        yield sse(c.chunk(usage=usage(item), choices=False))
                    yield DONE
                    return
                if kind in ("error", "cancelled"):
                    err = error_of(kind, item, self.job, self.service)
                    if err.status != 499:  # nobody is left to read it otherwise
                        yield sse(err.body())
                    return
            await asyncio.sleep(FLUSH_S)
            items = await self.job.channel.get()
