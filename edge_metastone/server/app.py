"""The FastAPI app: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, and the
web page at `/`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from edge_metastone.errors import InvalidRequestError
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import FIXED_EFFORTS
from edge_metastone.search.base import StrategyName
from edge_metastone.server.errors import ApiError, ErrorGuard
from edge_metastone.server.guard import (
    LOOPBACK_NAMES,
    AccessGuard,
    RequestLog,
    check_api_key,
    login_or_none,
    note,
)
from edge_metastone.server.schema import (
    ChatRequest,
    Completion,
    Limits,
    TextRequest,
    parse_request,
    to_options,
)
from edge_metastone.server.service import Channel, GenerationService, Job
from edge_metastone.server.streaming import EventStream, error_of, watch_client
from edge_metastone.server.text_completion import TextCompletion, TextEventStream

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MIB = 2**20


@dataclass(frozen=True)
class ServerSettings:
    """The server's limits; `serve`'s flags map 1:1 to these fields."""

    max_queue: int = 32  # requests waiting for a worker; more get a 503
    parallel: int = 16  # requests generated at once (batched together in the model's context)
    max_request_bytes: int = MIB  # larger bodies get a 413
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_k: int = 32  # the most candidates a request may generate (low 2, medium 8, high 32)
    think_budget: int | None = None  # a request's thinking budget unless it gives its own
    think_budget_message: str = ""  # written before the `</think>` a budget ends a thought with
    # a request's generation stops here and answers with the best candidate so far (None: no cap)
    max_request_seconds: float | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # names `Host` may carry (`*`: any); else 421
    api_key: str | None = field(default=None, repr=False)  # /v1/* needs it as a Bearer token

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise InvalidRequestError("max_queue must be >= 0")
        if not 1 <= self.parallel <= 256:
            raise InvalidRequestError("parallel must be between 1 and 256")
        if self.max_request_bytes < 1024:
            raise InvalidRequestError("max_request_bytes must be >= 1024")
        if self.max_tokens_limit < 1:
            raise InvalidRequestError("max_tokens_limit must be >= 1")
        if self.max_k < 2:
            raise InvalidRequestError("max_k must be >= 2 (effort low generates 2 candidates)")
        cap = self.max_request_seconds
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise InvalidRequestError("max_request_seconds must be a positive number of seconds")
        if not self.allowed_hosts:
            raise InvalidRequestError("allowed_hosts must name at least one host")
        check_api_key(self.api_key)


class _App(FastAPI):
    settings: ServerSettings

    def build_middleware_stack(self) -> ASGIApp:
        s = self.settings
        guarded = AccessGuard(super().build_middleware_stack(), s.allowed_hosts, s.api_key)
        return RequestLog(ErrorGuard(guarded))


def json_response(obj: Any, status: int = 200) -> Response:
    """Strict JSON (a non-finite number is an error, never invalid JSON)."""
    body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it passes `limit` bytes."""
    too_large = ApiError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    reasoner: Reasoner, settings: ServerSettings | None = None, *, model_id: str | None = None
) -> FastAPI:
    """An app serving `reasoner` as `model_id` (default: the model file's name without .gguf).
    The caller closes the reasoner after the server stops."""
    settings = settings or ServerSettings()
    service = GenerationService(
        reasoner, settings.max_queue, settings.max_request_seconds, settings.parallel
    )
    model_id = model_id or reasoner.model_path.name.removesuffix(".gguf")
    thinks = reasoner.backend.rule.thinks  # the model writes think markup
    if settings.think_budget is not None and not thinks:
        raise InvalidRequestError(
            "--think-budget needs a model that thinks inside <think> ... </think> tokens; "
            "this one has no such tokens"
        )
    limits = Limits(
        max_tokens=settings.max_tokens_limit,
        default_max_tokens=min(reasoner.max_new_tokens, settings.max_tokens_limit),
        max_k=settings.max_k,
        think_budget=settings.think_budget,
        think_budget_message=settings.think_budget_message,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()
        await asyncio.to_thread(service.join, 30.0)

    app = _App(title="edge-metastone", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.settings = settings
    app.state.service = service
    app.state.model_id = model_id
    _add_error_handlers(app)
    _add_model_routes(app, reasoner, model_id, limits)
    _add_completions_route(app, model_id, limits, settings.max_request_bytes, thinks)
    _add_page(app, settings.api_key)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Errors in the API's shape: an unknown path or method, and anything unexpected (a 500)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return ApiError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:  # ErrorGuard logs it
        return ApiError(500, "internal server error", type="server_error").response()


def _model_card(reasoner: Reasoner, model_id: str, limits: Limits) -> dict[str, Any]:
    """The served model as `/v1/models` lists it, with what a request may ask of it."""
    path = reasoner.model_path
    return {
        "id": model_id,
        "object": "model",
        "created": int(path.stat().st_mtime) if path.exists() else 0,
        "owned_by": "edge-metastone",
        "metastone": {
            "file": path.name,
            "has_head": reasoner.has_head,
            "default_strategy": reasoner.default_strategy.value,
            # how each selector chooses, so a client need not know the names' meaning
            "strategies": {s.value: {"vote": s.is_vote, "signal": s.signal} for s in StrategyName},
            "context_length": reasoner.facts.n_ctx_train,
            "max_tokens_limit": limits.max_tokens,
            "default_max_tokens": limits.default_max_tokens,
            "efforts": {e.value: e.k for e in FIXED_EFFORTS if e.k <= limits.max_k},
            # how a chat prompt is written: the file's template, a fallback, or "none" (raw only)
            "prompt_format": reasoner.prompt_format.name,
            "prompt_format_reason": reasoner.prompt_format.describe,
            "about": reasoner.about.to_json(),  # name, task, domain, which step signal informs
        },
    }


def _add_model_routes(app: FastAPI, reasoner: Reasoner, model_id: str, limits: Limits) -> None:
    """`/v1/models`, `/v1/models/{name}` and `/health`."""
    service: GenerationService = app.state.service

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [_model_card(reasoner, model_id, limits)]})

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> Response:
        if name != model_id:
            return _unknown_model(name, model_id).response()
        return json_response(_model_card(reasoner, model_id, limits))

    @app.get("/health")
    async def health() -> Response:
        return json_response(
            {
                "status": "shutting_down" if service.closing else "ok",
                "model": model_id,
                "running": service.running,
                "queued": service.queued,
                **service.stats.__dict__,
            }
        )


def _add_completions_route(
    app: FastAPI, model_id: str, limits: Limits, max_bytes: int, thinks: bool
) -> None:
    """`/v1/chat/completions` and `/v1/completions` (a raw prompt): a request queued on the
    service, answered whole or streamed (`thinks`: a chat choice's thought goes in
    `reasoning_content`)."""
    service: GenerationService = app.state.service

    async def serve(request: Request, kind: type, make: Any, stream_class: type) -> Any:
        arrival = time.monotonic()
        try:
            req = parse_request(await read_body(request, max_bytes), kind)
            if req.model is not None and req.model != model_id:
                raise _unknown_model(req.model, model_id)
            prompt, options = to_options(req, limits)
            job = Job(prompt, options, Channel(asyncio.get_running_loop()), stream=req.stream)
            job.arrival = arrival
            note(request.scope, job=job)
            service.submit(job)
        except ApiError as e:
            return e.response()
        completion = make(req.n)
        # the stream's headers wait for its first event: errors before it get their own status
        first = await watch_client(job.channel.get(), request.receive, service, job)
        terminal = next(((k, x) for k, x in first if k != "event"), None)
        if terminal is not None and terminal[0] != "result":
            return error_of(*terminal, job, service).response()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream_class(service, job, first, completion, include_usage)
        return json_response(completion.response(terminal[1], options.seed, capped=job.capped))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        make = lambda n: Completion(model_id, n, thinks=thinks)  # noqa: E731
        return await serve(request, ChatRequest, make, EventStream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        make = lambda n: TextCompletion(model_id, n)  # noqa: E731
        return await serve(request, TextRequest, make, TextEventStream)


def _add_page(app: FastAPI, api_key: str | None) -> None:
    """The web page at `/` and its files under `/static`. With an API key, `/` first asks for the
    key and keeps it as the page's session cookie (`guard.login_or_none`)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    async def index(request: Request) -> Response:
        login = login_or_none(request, api_key) if api_key else None
        if login is not None:
            return login
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


def _unknown_model(name: str, model_id: str) -> ApiError:
    return ApiError(
        404,
        f"the model {name!r} does not exist; this server serves {model_id!r}",
        param="model",
        code="model_not_found",
    )
