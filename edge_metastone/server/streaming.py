"""Server-sent events for a streaming request, and waiting on a request while watching its client.

A stream is OpenAI's chunk sequence: a first chunk with the assistant role; progress chunks whose
`metastone.events` carry every candidate's tokens, scored steps and finishes as they happen, and
whose `delta.reasoning_content` says in words what stays true (`progress.Progress`: waves,
each candidate's answer and score as it finishes, which has the highest SPRM score so far; the answer is not known until
the candidates are compared); then the chosen candidate's thought as `reasoning_content`, its
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

from edge_metastone.options import ReasonResult
from edge_metastone.server.errors import ApiError, from_exception, shutting_down
from edge_metastone.server.progress import Progress, message, split_thinking
from edge_metastone.server.schema import (
    Completion,
    choice_finish,
    event_json,
    extension,
    finish_reason,
    ranked,
    usage,
)
from edge_metastone.server.service import Cancel, GenerationService, Job
from edge_metastone.types import Event

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
        for chunk in self._opening():
            yield sse(chunk)
        items = self.first
        while True:
            chunk = self._progress([ev for kind, ev in items if kind == "event"])
            if chunk is not None:
                yield sse(chunk)
            for kind, item in items:
                if kind == "result":
                    for chunk in self._ending(item):
                        yield sse(chunk)
                    yield DONE
                    return
                if kind in ("error", "cancelled"):
                    err = error_of(kind, item, self.job, self.service)
                    if err.status != 499:  # nobody is left to read it otherwise
                        yield sse(err.body())
                    return
            await asyncio.sleep(FLUSH_S)
            items = await self.job.channel.get()

    def _opening(self) -> list[dict[str, Any]]:
        """The chunks sent before any event: the assistant role."""
        self._said = Progress(self.job.options.effort.value)
        return [self.completion.chunk({"role": "assistant", "content": ""})]

    def _progress(self, events: list[Event]) -> dict[str, Any] | None:
        """The chunk for a batch of events: them in `metastone.events`, and the progress lines
        they make in `reasoning_content` (None: nothing to send)."""
        said = self._said.lines(events)
        if not events and not said:
            return None
        delta = {"reasoning_content": said} if said else None
        return self.completion.chunk(delta, metastone={"events": [event_json(e) for e in events]})

    def _ending(self, item: ReasonResult) -> list[dict[str, Any]]:
        """The chunks that end a stream: the chosen candidate's thought (`Progress.closing`)
        and its answer, with `metastone.result`; its finish; the other choices (`n`), each as one
        message; the usage chunk when asked for."""
        c = self.completion
        seed = self.job.options.seed
        result = extension(item, seed, capped=self.job.capped)
        closing = Progress.closing(item, c.thinks)
        out = [c.chunk({"reasoning_content": "\n" + closing})] if c.thinks else []
        _, answer = split_thinking(item.chosen_candidate.text, c.thinks)
        out.append(c.chunk({"content": answer}, metastone={"events": [], "result": result}))
        out.append(c.chunk(finish=finish_reason(item)))
        for i, cand in enumerate(ranked(item, c.n)[1:], start=1):
            out.append(c.chunk(message(cand, c.thinks), index=i))
            out.append(c.chunk(finish=choice_finish(cand), index=i))
        if self.include_usage:
            out.append(c.chunk(usage=usage(item), choices=False))
        return out
