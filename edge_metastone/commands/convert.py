"""`edge-metastone convert HF_DIR -o OUT.gguf [--outtype ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from converters.quant_mix import OutType


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "convert", help="convert a Hugging Face MetaStone/Qwen2 checkpoint to one GGUF"
    )
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.gguf")
    p.add_argument(
        "--outtype",
        choices=[t.value for t in OutType],
        default=OutType.F16.value,
        help="tensor types of the output (default f16); the SPRM head is always kept exact",
    )
    p.add_argument(
        "--head-only",
        action="store_true",
        help="write only the SPRM head, as a sidecar GGUF (NAME.sprm.gguf) for an existing model file",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Convert and report."""
    from converters.convert import convert, write_head_sidecar

    if args.head_only:
        path = write_head_sidecar(args.hf_dir, args.output)
        print(f"wrote SPRM head sidecar {path}", file=sys.stderr)
        return 0
    result = convert(args.hf_dir, args.output, args.outtype, progress=not args.no_progress)
    head = (
        "with SPRM head"
        if result.has_head
        else "NO SPRM head (score_module.pt not found): scoring unavailable"
    )
    print(
        f"wrote {result.path} ({result.out_type.value}, {result.n_tensors} tensors, "
        f"{result.n_bytes / 2**20:.1f} MiB), {head}",
        file=sys.stderr,
    )
    return 0
