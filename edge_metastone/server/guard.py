"""Who may talk to the server: the `Host` header (against DNS rebinding), the API key (a Bearer
token, or the page's session cookie), and JSON bodies only (a cross-site page cannot POST
`application/json` without a CORS preflight, and the server answers no preflight).

The page and an API key: `GET /` without a session shows a small form asking for the key; a right
key (`/?key=KEY`) sets an HttpOnly, SameSite=Strict cookie and redirects to the page, whose own
requests then carry the cookie. No CORS headers are ever sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_metastone.errors import InvalidRequestError
from edge_metastone.server.errors import ApiError

ACCESS_LOGGER = "edge_metastone.server.access"  # one line per request; `serve --quiet` mutes it
access_log = logging.getLogger(ACCESS_LOGGER)

API_KEY_ENV = "EDGE_METASTONE_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")
SESSION_COOKIE = "edge_metastone_session"
LOG_KEY = "edge_metastone.log"  # the scope entry where a route leaves what the log line shows


def host_name(value: str) -> str | None:
    """The name part of a `Host` header or `--allowed-host` value (`name`, `name:port`,
    `[v6]`, `[v6]:port`), lower-case; None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    elif value.count(":") == 1:
        name, port = value.split(":")
        if not port.isdigit():
            return None
    elif ":" in value:  # a bare IPv6 address is not a valid Host
        return None
    else:
        name = value
    name = name.removesuffix(".")
    if not name or any(c.isspace() or c in "/@?#" for c in name):
        return None
    return name


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The names `Host` may carry: the loopback names, the bound address (a wildcard bind adds the
    machine's name), and `extra` (`--allowed-host`; `*` accepts any)."""
    names = list(LOOPBACK_NAMES)
    bound = bind.strip().lower().strip("[]")
    if bound in WILDCARDS:
        names.append(socket.gethostname().lower())
    else:
        names.append(bound)
    for value in extra:
        name = "*" if value.strip() == "*" else host_name(value)
        if name is None:
            raise InvalidRequestError(f"--allowed-host {value!r} is not a host name or address")
        names.append(name)
    return tuple(dict.fromkeys(names))


def check_api_key(key: str | None) -> str | None:
    """`key` when it is usable as a Bearer token (printable ASCII, no spaces); None when unset."""
    if not key:
        return None
    if not key.isascii() or not key.isprintable() or " " in key:
        raise InvalidRequestError("the API key must be printable ASCII without spaces")
    return key


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison (of digests, so the length does not show either)."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def session_token(key: str) -> str:
    """The page's cookie value: derived from the key, so the cookie never holds the key itself."""
    return hmac.new(key.encode(), b"edge-metastone page session", hashlib.sha256).hexdigest()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def has_session(request: Request, key: str) -> bool:
    """True when the request carries the page's session cookie for `key`."""
    cookie = request.cookies.get(SESSION_COOKIE)
    return cookie is not None and same_secret(cookie, session_token(key))


def authorized(request: Request, key: str) -> bool:
    """A right Bearer token or the page's session cookie."""
    token = _bearer(request)
    if token is not None and same_secret(token, key):
        return True
    return has_session(request, key)


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


class AccessGuard:
    """ASGI layer in front of the app: 421 for a `Host` not served here, 401 for an API request
    without the key (when one is set), 415 for a POST whose body is not `application/json`."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...], api_key: str | None) -> None:
        self.app = app
        self.hosts = hosts
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self.refusal(Request(scope))
        if err is not None:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> ApiError | None:
        """The error a request gets before the app sees it, or None."""
        name = host_name(request.headers.get("host", ""))
        if "*" not in self.hosts and name not in self.hosts:
            shown = request.headers.get("host", "")[:100]
            return ApiError(
                421,
                f"this server does not answer for the host {shown!r}; start it with "
                "--allowed-host NAME to accept another name",
                code="host_not_allowed",
            )
        path = request.url.path
        api = path == "/v1" or path.startswith("/v1/")
        if self.api_key and api and not authorized(request, self.api_key):
            return ApiError(
                401,
                "incorrect API key provided"
                if _bearer(request) is not None
                else "this server needs an API key: send 'Authorization: Bearer KEY' "
                "(the page asks for it at /)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if request.method == "POST" and not _is_json(request.headers.get("content-type", "")):
            return ApiError(
                415,
                "the request body must be sent with 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        return None


_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-metastone</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 30em; margin: 3em auto">
<h1>edge-metastone</h1><p>{message}</p>
<form method="get" action="/"><input type="password" name="key" autocomplete="current-password"
 placeholder="API key" autofocus required> <button>Open the page</button></form>
</body></html>
"""


def login_or_none(request: Request, key: str) -> Response | None:
    """For `GET /` on a server with an API key: None when the request has a session (serve the
    page), a redirect that sets the session for a right `?key=`, else the form asking for it."""
    given = request.query_params.get("key")
    if given is None and has_session(request, key):
        return None
    if given is not None and same_secret(given, key):
        redirect = RedirectResponse("/", status_code=303)
        redirect.set_cookie(SESSION_COOKIE, session_token(key), httponly=True, samesite="strict")
        return redirect
    message = (
        "That key is not this server's API key."
        if given is not None
        else "This server needs its API key (<code>serve --api-key</code>)."
    )
    return HTMLResponse(
        _LOGIN.format(message=message), status_code=401, headers={"cache-control": "no-store"}
    )


def note(scope: Scope, **fields: Any) -> None:
    """Leave something for the request's log line (e.g. `job=`, whose tokens it shows)."""
    info = scope.get(LOG_KEY)
    if isinstance(info, dict):
        info.update(fields)


def _printable(text: str, limit: int = 200) -> str:
    """Untrusted text for one log line: control characters escaped, at most `limit` chars."""
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


class RequestLog:
    """Outermost ASGI layer: one line per request on the access logger (client, method, path,
    status, tokens generated, seconds until the response ended)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        info: MutableMapping[str, Any] = {"status": None}
        scope[LOG_KEY] = info

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            job = info.get("job")
            tokens = f"{job.tokens} tokens" if job is not None else "-"
            client = scope.get("client")
            access_log.info(
                "%s %s %s %s %s %.2f s",
                client[0] if client else "-",
                _printable(scope.get("method", "")),
                _printable(scope.get("path", "")),
                info["status"] or "-",
                tokens,
                time.monotonic() - t0,
            )
