"""`edge-metastone serve [--model FILE.gguf] [--host 127.0.0.1] [--port 8080]`: the OpenAI-compatible
server and the web page."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_metastone.commands import add_threads_and_gpu, add_weight_buffers, open_reasoner
from edge_metastone.errors import EdgeMetastoneError, InvalidRequestError

if TYPE_CHECKING:
    from edge_metastone.server.app import ServerSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions) and a web page at /"
    )
    _add_model_options(p)
    _add_limit_options(p)
    _add_access_options(p)
    add_weight_buffers(p)
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure this machine again before serving (see `edge-metastone calibrate`)",
    )
    p.set_defaults(run=run)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What is served, where, on what hardware."""
    p.add_argument(
        "--model", type=Path, default=None, help="model GGUF (default: the embedded model)"
    )
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the SPRM head")
    p.add_argument(
        "--model-id",
        default=None,
        help="the model's name in the API (default: the file name without .gguf)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port)")
    add_threads_and_gpu(p)


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """What a request may ask for, how many may wait, and how long a shutdown waits."""
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per candidate when a request gives no max_tokens (default: the model's own: "
        "its task's answer length, 160 for the embedded model; 1024 for a model without one)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=4096,
        help="the largest max_tokens a request may ask for (default 4096)",
    )
    p.add_argument(
        "--max-k",
        type=int,
        default=32,
        help="the most candidates a request may generate: 2 low, 8 medium, 32 high (default 32)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=16,
        help="requests generated at once, their candidates decoded together as one batch in the "
        "model's shared context (default 16; 1: one request at a time)",
    )
    p.add_argument(
        "--think-budget",
        type=int,
        default=None,
        metavar="N",
        help="a request's thinking budget when it gives no thinking_budget_tokens (default: none)",
    )
    p.add_argument("--think-budget-message", default="", metavar="TEXT")
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        help="requests waiting for one of the --parallel places; more get 503 + Retry-After "
        "(default 32)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=2**20,
        help="largest request body; larger get 413 (default 1 MiB)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on Ctrl-C/SIGTERM, time given to requests in flight before they are cancelled "
        "(default 10; a second Ctrl-C cancels at once)",
    )


def _add_access_options(p: argparse.ArgumentParser) -> None:
    """Who may use the server, and the request log."""
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the Host header may carry (repeatable; '*': any). Accepted always: "
        "localhost, 127.0.0.1, [::1] and the --host address (a wildcard adds this machine's "
        "name); any other Host gets a 421, against DNS rebinding",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); the page at / asks "
        "for the key once and keeps a session cookie (default: $EDGE_METASTONE_API_KEY, which "
        "keeps the key out of `ps`; unset: no key)",
    )
    p.add_argument(
        "--max-request-seconds",
        type=float,
        default=None,
        metavar="S",
        help="stop a request's generation S seconds after it starts and answer with the best "
        "candidate so far, marked metastone.capped (default: no cap)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no request log (default: one line per request on stderr: client, method, path, "
        "status, tokens, seconds)",
    )


def _settings(args: argparse.Namespace) -> ServerSettings:
    """`ServerSettings` from the flags (the API key from $EDGE_METASTONE_API_KEY when not given)."""
    from edge_metastone.server.app import ServerSettings
    from edge_metastone.server.guard import API_KEY_ENV, allowed_hosts, check_api_key

    return ServerSettings(
        max_queue=args.max_queue,
        parallel=args.parallel,
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        max_k=args.max_k,
        think_budget=args.think_budget,
        think_budget_message=args.think_budget_message,
        max_request_seconds=args.max_request_seconds,
        allowed_hosts=allowed_hosts(args.host, args.allowed_host),
        api_key=check_api_key(args.api_key or os.environ.get(API_KEY_ENV)),
    )


def _log_requests(quiet: bool) -> None:
    """The request log: one plain line per request on stderr, unless `quiet`."""
    from edge_metastone.server.guard import ACCESS_LOGGER

    log = logging.getLogger(ACCESS_LOGGER)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edge-metastone serve: %(message)s"))
    log.addHandler(handler)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or one clear error (port in use, bad address)."""
    if not 0 <= port <= 65535:
        raise InvalidRequestError("port must be between 0 and 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise EdgeMetastoneError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    """Load the model, serve until Ctrl-C/SIGTERM, then drain and stop."""
    import uvicorn

    from edge_metastone.commands.calibrate import ProgressBar
    from edge_metastone.server.app import create_app
    from edge_metastone.server.runner import DrainingServer

    settings = _settings(args)
    if not (0 <= args.shutdown_timeout <= 24 * 3600):
        raise InvalidRequestError("--shutdown-timeout must be between 0 and 86400 seconds")
    _log_requests(args.quiet)
    sock = listen(args.host, args.port)
    with (
        contextlib.closing(sock),
        open_reasoner(
            args, max_new_tokens=args.max_new_tokens, on_calibration=ProgressBar()
        ) as reasoner,
    ):
        if args.recalibrate:  # now, not inside the first request
            reasoner.calibration(refresh=True)
        app = create_app(reasoner, settings, model_id=args.model_id)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # the request log (`--quiet` mutes it) replaces uvicorn's
            timeout_graceful_shutdown=args.shutdown_timeout + 10,
        )
        server = DrainingServer(config, app.state.service, args.shutdown_timeout)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        key = " (API key required)" if settings.api_key else ""
        print(
            f"edge-metastone serve: {app.state.model_id} on http://{shown}:{port}/ "
            f"(API: http://{shown}:{port}/v1{key}; Ctrl-C stops)",
            flush=True,
        )
        if args.host not in LOOPBACK and not settings.api_key:
            print(
                f"edge-metastone serve: warning: listening on {args.host}, reachable from other "
                "machines, without --api-key",
                file=sys.stderr,
                flush=True,
            )
        server.run(sockets=[sock])
        app.state.service.stop()  # after a forced exit too: nothing runs on a closed model
    print("edge-metastone serve: stopped", flush=True)
    return 0
