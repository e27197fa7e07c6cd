"""One module per `edge-metastone` command; shared option helpers here."""

from __future__ import annotations

import argparse

# `--weight-buffers`: the CLI sets this variable, so every model this process (and its children)
# loads follows it (edge_metastone.engine.weight_buffers reads it; importing that loads llama.cpp)
WEIGHT_BUFFERS_ENV = "EDGE_METASTONE_WEIGHT_BUFFERS"
WEIGHT_BUFFER_MODES = ("auto", "extra", "repack", "plain")


def add_weight_buffers(p: argparse.ArgumentParser) -> None:
    """The `--weight-buffers` option of every command that loads a GGUF."""
    p.add_argument(
        "--weight-buffers",
        choices=WEIGHT_BUFFER_MODES,
        default=None,
        help="where llama.cpp keeps the weights: auto (default; never AMX), extra (llama.cpp's "
        "default), repack (CPU_REPACK only), plain (no extra buffer types); "
        f"also ${WEIGHT_BUFFERS_ENV}",
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
