"""`edge-metastone score --model FILE.gguf --text-file TEXT [--json]` (SPEC §3)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_metastone.commands import add_weight_buffers, print_json
from edge_metastone.errors import EdgeMetastoneError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "score", help="score the reasoning steps of one full text with the SPRM head"
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="FILE.gguf",
        help="a GGUF file or an ONNX model directory",
    )
    p.add_argument("--text-file", type=Path, required=True, metavar="TEXT")
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the head")
    p.add_argument("--json", action="store_true", help="print {positions, step_scores, score}")
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload when llama-cpp-python is built with CUDA/Metal (-1: all)",
    )
    add_weight_buffers(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Score and print."""
    from edge_metastone.runtime import open_backend

    try:
        text = args.text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeMetastoneError(f"cannot read {args.text_file}: {e}") from None
    backend = open_backend(args.model, head=args.head, n_gpu_layers=args.gpu_layers)
    try:
        result = backend.score_text(text)
    finally:
        backend.close()
    if args.json:
        print_json(result.to_json())
        return 0
    print(f"{result.n_tokens} tokens, {len(result.positions)} scored steps")
    for pos, s in zip(result.positions, result.step_scores, strict=True):
        print(f"  step at token {pos:6d}: {s:.4f}")
    print(f"trajectory score (geometric mean): {result.score:.6f}")
    return 0
