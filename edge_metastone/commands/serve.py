"""`edge-metastone serve [--model FILE.gguf] [--host 127.0.0.1] [--port 8080]`: the OpenAI-compatible
server and the web page."""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from pathlib import Path

from edge_metastone.commands import add_weight_buffers
from edge_metastone.errors import EdgeMetastoneError, InvalidRequestError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions) and a web page at /"
    )
    _add_model_options(p)
    _add_limit_options(p)
    add_weight_buffers(p)
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
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload when llama-cpp-python is built with CUDA/Metal (-1: all)",
    )


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    """What a request may ask for, how many may wait, and how long a shutdown waits."""
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024,
        help="tokens per candidate when a request gives no max_tokens (default 1024)",
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
        "--max-queue",
        type=int,
        default=32,
        help="requests waiting behind the running one; more get 503 + Retry-After (default 32)",
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

    from edge_metastone.reasoner import Reasoner
    from edge_metastone.server.app import ServerSettings, create_app
    from edge_metastone.server.runner import DrainingServer

    settings = ServerSettings(
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        max_k=args.max_k,
    )
    if not (args.shutdown_timeout >= 0):
        raise InvalidRequestError("--shutdown-timeout must be >= 0")
    sock = listen(args.host, args.port)
    with (
        contextlib.closing(sock),
        Reasoner(
            args.model,
            head=args.head,
            n_threads=args.threads,
            n_gpu_layers=args.gpu_layers,
            max_new_tokens=args.max_new_tokens,
        ) as reasoner,
    ):
        app = create_app(reasoner, settings, model_id=args.model_id)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=args.verbose > 0,
            timeout_graceful_shutdown=args.shutdown_timeout + 10,
        )
        server = DrainingServer(config, app.state.service, args.shutdown_timeout)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"edge-metastone serve: {app.state.model_id} on http://{shown}:{port}/ "
            f"(API: http://{shown}:{port}/v1; Ctrl-C stops)",
            flush=True,
        )
        if args.host not in LOOPBACK:
            print(
                f"edge-metastone serve: warning: listening on {args.host}, reachable from other "
                "machines; the server has no authentication",
                file=sys.stderr,
                flush=True,
            )
        server.run(sockets=[sock])
        app.state.service.stop()  # after a forced exit too: nothing runs on a closed model
    print("edge-metastone serve: stopped", flush=True)
    return 0
