"""`edge-metastone <command>`: parse, dispatch, and turn typed errors into one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from edge_metastone.commands import (
    batch,
    convert,
    doctor,
    inspect,
    reason,
    score,
    serve,
    train_sprm,
)
from edge_metastone.engine.weight_buffers import ENV_VAR as WEIGHT_BUFFERS_ENV
from edge_metastone.errors import EdgeMetastoneError

COMMANDS = (convert, inspect, score, reason, batch, train_sprm, serve, doctor)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command module."""
    parser = argparse.ArgumentParser(
        prog="edge-metastone",
        description="Reflective generative models (MetaStone-S1) on ordinary machines.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:  # llama.cpp's own messages only with -v: errors are our one line
        logging.getLogger("llama_cpp.native").setLevel(logging.CRITICAL)
    elif args.verbose == 1:
        logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)
    if getattr(args, "weight_buffers", None):  # every load in this process and its children
        os.environ[WEIGHT_BUFFERS_ENV] = args.weight_buffers
    try:
        return int(args.run(args) or 0)
    except EdgeMetastoneError as e:
        print(f"edge-metastone {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-metastone {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
