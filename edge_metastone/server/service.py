"""The request queue in front of the one loaded model: a bounded FIFO, `parallel` worker threads
that run requests through `Reasoner.reason` at the same time (the model batches them: their
candidates decode together in its shared context), and a channel per request back to the event
loop.

Requests wait here, not on the Reasoner's lock, so the queue is bounded and first-come
first-served, and a request whose client went away leaves the queue without touching the model.
A request's latency budget counts from its arrival: the worker passes on the time it has left.
Requests start in arrival order; once started, a request waits only for room in the model's context
(sequences), again in arrival order.
`max_request_seconds` caps a request's generation (from when the worker starts it): the Reasoner's
deadline halts the search there as at a latency budget, and the best candidate so far answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import threading
import time
from typing import Any

from edge_metastone.options import Prompt, ReasonOptions, ReasonResult, latency_deadline
from edge_metastone.reasoner import Reasoner
from edge_metastone.server.errors import ApiError, shutting_down, unavailable
from edge_metastone.types import Event, TokenEvent

logger = logging.getLogger(__name__)


class Cancel(str, enum.Enum):
    """Why a request stopped before its result."""

    CLIENT = "client"  # the client disconnected
    SHUTDOWN = "shutdown"  # the server is stopping


class _Cancelled(Exception):
    """Raised from the event hook to unwind a generation nobody waits for."""


class Channel:
    """Items from the worker thread to one request's coroutine. Puts wake the loop at most once
    per drain, so a fast token stream does not flood the event loop with callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[str, Any]] = collections.deque()
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._signalled = False

    def put(self, kind: str, item: Any = None) -> None:
        """Queue an item (any thread)."""
        self._items.append((kind, item))
        with self._lock:
            if self._signalled:
                return
            self._signalled = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> list[tuple[str, Any]]:
        """Every item queued so far (waits for at least one)."""
        while True:
            await self._ready.wait()
            with self._lock:
                self._signalled = False
                self._ready.clear()
            items = []
            while self._items:
                items.append(self._items.popleft())
            if items:
                return items


class Job:
    """One request: its prompt and options, its arrival time, and its channel of results.

    The channel carries ("event", Event) when streaming, then exactly one of ("result",
    ReasonResult), ("error", exception) or ("cancelled", Cancel).
    """

    def __init__(
        self, prompt: Prompt, options: ReasonOptions, channel: Channel, *, stream: bool
    ) -> None:
        self.prompt = prompt
        self.options = options
        self.channel = channel
        self.stream = stream
        self.arrival = time.monotonic()
        self.ahead = 0  # requests in front of this one when it arrived
        self.tokens = 0  # tokens generated for it so far
        self.capped = False  # the server's time cap stopped its generation
        self.cancelled: Cancel | None = None
        self.done = False

    def on_event(self, ev: Event) -> None:
        """The Reasoner's event hook (worker thread): forward, or unwind if nobody listens."""
        if self.cancelled is not None:
            raise _Cancelled
        if isinstance(ev, TokenEvent):
            self.tokens += 1
        if self.stream:
            self.channel.put("event", ev)


@dataclasses.dataclass
class Stats:
    """Counters shown by `/health`."""

    served: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    generated_tokens: int = 0


class GenerationService:
    """A bounded FIFO of `Job`s served `parallel` at a time by worker threads."""

    def __init__(
        self,
        reasoner: Reasoner,
        max_queue: int,
        max_request_seconds: float | None = None,
        parallel: int = 1,
    ) -> None:
        self.reasoner = reasoner
        self.max_queue = max_queue
        self.parallel = max(1, parallel)
        self.max_request_seconds = max_request_seconds
        self.stats = Stats()
        self.closing = False
        self._jobs: collections.deque[Job] = collections.deque()
        self._running: set[Job] = set()
        self._cond = threading.Condition()
        self._mean_service_s = 1.0  # running mean of one request's time, for Retry-After
        self._threads = [
            threading.Thread(target=self._work, name=f"edge-metastone-serve-{i}", daemon=True)
            for i in range(self.parallel)
        ]

    def start(self) -> None:
        """Start the workers."""
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        """Requests waiting (not counting the running one)."""
        return len(self._jobs)

    @property
    def running(self) -> int:
        """Requests being generated now."""
        return len(self._running)

    def submit(self, job: Job) -> None:
        """Queue a request, or raise a 503 `ApiError` when the queue is full or the server stops."""
        with self._cond:
            if self.closing:
                raise shutting_down()
            if len(self._jobs) >= self.max_queue:
                self.stats.rejected += 1
                wait = self._mean_service_s * (len(self._jobs) + 1) / self.parallel
                raise unavailable(
                    f"the request queue is full ({self.max_queue} waiting); retry later",
                    wait,
                    code="queue_full",
                )
            job.ahead = max(0, len(self._jobs) + len(self._running) - self.parallel + 1)
            self._jobs.append(job)
            self._cond.notify()

    def cancel(self, job: Job, why: Cancel) -> None:
        """Stop a request: it leaves the queue, or its generation unwinds at the next token."""
        with self._cond:
            if job.done or job.cancelled is not None:
                return
            job.cancelled = why
            if job in self._jobs:
                self._jobs.remove(job)
                job.done = True
            self.stats.cancelled += 1
        job.channel.put("cancelled", why)

    def stop(self) -> None:
        """Refuse new requests and cancel every queued and running one (they get a 503)."""
        with self._cond:
            self.closing = True
            jobs = [*self._jobs, *self._running]
            self._cond.notify_all()
        for job in jobs:
            self.cancel(job, Cancel.SHUTDOWN)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workers to finish (after `stop`)."""
        end = time.monotonic() + timeout if timeout is not None else None
        for t in self._threads:
            if t.is_alive():
                t.join(None if end is None else max(0.0, end - time.monotonic()))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self.closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running.add(job)
            t0 = time.monotonic()
            kind, item = "error", None
            try:
                kind, item = self._run(job)
            finally:
                with self._cond:
                    self._running.discard(job)
                    job.done = True
                    self.stats.generated_tokens += job.tokens
                    if kind == "result":
                        self.stats.served += 1
                        self._mean_service_s += 0.2 * (time.monotonic() - t0 - self._mean_service_s)
                    elif kind == "error":
                        self.stats.failed += 1
            if kind != "cancelled":
                job.channel.put(kind, item)

    def _run(self, job: Job) -> tuple[str, Any]:
        options = job.options
        end = latency_deadline(options, job.arrival)  # the Reasoner plans with what is left
        if end is not None and end <= time.monotonic() and job.ahead:
            err = unavailable(
                f"the latency budget ({options.latency_budget} s) ran out while the request was "
                "queued",
                self._mean_service_s,
                code="budget_exceeded_in_queue",
            )
            return "error", err
        cap = self.max_request_seconds
        deadline = time.monotonic() + cap if cap is not None else None
        try:
            result: ReasonResult = self.reasoner.reason(
                job.prompt, options, on_event=job.on_event, deadline=deadline, arrival=job.arrival
            )
        except _Cancelled:
            return "cancelled", job.cancelled
        except ApiError as e:
            return "error", e
        except Exception as e:  # reported to the client by the request's coroutine
            if job.cancelled is not None:  # e.g. the reasoner closed under a cancelled request
                return "cancelled", job.cancelled
            return "error", e
        return capped(job, result, self.max_request_seconds)


def capped(job: Job, result: ReasonResult, cap: float | None) -> tuple[str, Any]:
    """The result, marked when the time cap (not the request's own budget) stopped it; an
    error when the cap came before any candidate had an answer."""
    if result.stopped_by != "time_limit":
        return "result", result  # not stopped early, or by the request's own budget
    job.capped = True
    if not result.answer.strip():
        return "error", ApiError(
            503,
            f"the request reached this server's time limit ({cap:g} s, "
            "--max-request-seconds) before any candidate had an answer; ask for less (a lower "
            "effort, fewer max_tokens)",
            type="server_error",
            code="request_time_limit",
        )
    return "result", result
