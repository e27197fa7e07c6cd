"""OpenAI-style error bodies: the package's error *types* mapped to HTTP statuses, and a guard
that turns anything unexpected into a 500 body with one log line (never a traceback)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_metastone.errors import (
    BudgetError,
    ContextExceededError,
    EdgeMetastoneError,
    InvalidRequestError,
    MissingHeadError,
)

logger = logging.getLogger(__name__)


@dataclass
class ApiError(Exception):
    """An error answered with `{"error": {message, type, param, code}}` and an HTTP status."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        """The JSON error object (the same inside a stream)."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        """The error as an HTTP response."""
        return Response(
            json.dumps(self.body(), ensure_ascii=False).encode(),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request cannot be served as asked."""
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: float, *, code: str) -> ApiError:
    """A 503 with a `Retry-After` header (whole seconds, at least 1)."""
    seconds = max(1, min(3600, int(retry_after + 0.999)))
    return ApiError(
        503, message, type="server_overloaded", code=code, headers={"Retry-After": str(seconds)}
    )


def shutting_down() -> ApiError:
    """The server stopped before the request was served."""
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def from_exception(e: BaseException, *, queued: bool = False, closing: bool = False) -> ApiError:
    """Map an exception raised while serving a request to its API error, by type.

    `queued`: the request waited behind others (a budget it then missed is the server's load, a
    503, not the request's fault). `closing`: the server is shutting down (the reasoner refuses).
    """
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextExceededError):
        return bad_request(str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, BudgetError):
        if queued:
            return unavailable(str(e), 1.0, code="budget_exceeded_in_queue")
        return bad_request(str(e), param="latency_budget", code="budget_cannot_be_met")
    if isinstance(e, InvalidRequestError):
        return bad_request(str(e), param=e.param)
    if isinstance(e, MissingHeadError):
        return bad_request(str(e))
    if closing:
        return shutting_down()
    if isinstance(e, EdgeMetastoneError):
        logger.error("request failed: %s", e)
        return ApiError(500, str(e), type="server_error")
    logger.error("internal error: %s: %s", type(e).__name__, e)
    logger.debug("internal error", exc_info=e)
    return ApiError(500, "internal server error", type="server_error")


class ErrorGuard:
    """Outermost ASGI layer: an exception that escapes the app becomes a 500 error body and one
    log line, so neither the client nor the server's stderr ever sees a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            err = from_exception(e)
            if not started:
                await err.response()(scope, receive, send)
