"""One module per `edge-metastone` command; shared option helpers here."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from edge_metastone.types import WEIGHT_BUFFERS_ENV, WeightBuffers

if TYPE_CHECKING:
    from edge_metastone.reasoner import Reasoner


def add_threads_and_gpu(p: argparse.ArgumentParser) -> None:
    """The `--threads` and `--gpu-layers` options of every command that loads a model."""
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload when llama-cpp-python is built with CUDA/Metal (-1: all)",
    )


def add_stop(p: argparse.ArgumentParser) -> None:
    """`--stop TEXT` (repeatable) of the commands that generate; read it with `stop_strings`."""
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end a candidate where TEXT appears (repeatable; \\n is a newline; e.g. a few-shot "
        "prompt's separator '\\n\\n')",
    )


def stop_strings(args: argparse.Namespace) -> tuple[str, ...]:
    """The --stop texts, with `\\n` and `\\t` typed on a command line as the characters."""
    return tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop)


def add_weight_buffers(p: argparse.ArgumentParser) -> None:
    """The `--weight-buffers` option of every command that loads a GGUF."""
    p.add_argument(
        "--weight-buffers",
        choices=[m.value for m in WeightBuffers],
        default=None,
        help="where llama.cpp keeps the weights: auto (default; never AMX), extra (llama.cpp's "
        "default), repack (CPU_REPACK only), plain (no extra buffer types); "
        f"also ${WEIGHT_BUFFERS_ENV}",
    )


def open_reasoner(args: argparse.Namespace, **extra: Any) -> Reasoner:
    """The model a command's options name (--model, --head, --threads, --gpu-layers,
    --weight-buffers), opened; `extra`: the Reasoner's other settings."""
    from edge_metastone.reasoner import Reasoner

    return Reasoner(
        args.model,
        head=args.head,
        n_threads=args.threads,
        n_gpu_layers=args.gpu_layers,
        weight_buffers=args.weight_buffers,
        **extra,
    )


def print_json(obj: object, **kwargs: object) -> None:
    """Print `obj` as strict JSON on stdout: a NaN or infinity is an error, never invalid JSON."""
    import json

    from edge_metastone.errors import EdgeMetastoneError

    try:
        text = json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        raise EdgeMetastoneError(f"the result holds a non-finite number ({e})") from None
    print(text)
