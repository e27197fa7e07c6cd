"""`edge-metastone convert HF_DIR -o OUT.gguf [--outtype ...]`, or `--format onnx -o DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_metastone.converters.quant_mix import OutType
from edge_metastone.errors import BadCheckpointError

ONNX_OUT_TYPES = ("f32", "int4")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "convert", help="convert a Hugging Face MetaStone/Qwen2 checkpoint to one GGUF"
    )
    p.add_argument("hf_dir", type=Path, metavar="HF_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.gguf|DIR")
    p.add_argument(
        "--format",
        choices=["gguf", "onnx"],
        default="gguf",
        help="gguf (one file, llama.cpp) or onnx (a model directory, onnxruntime; needs "
        "pip install 'edge-metastone[onnx-export]')",
    )
    p.add_argument(
        "--outtype",
        choices=sorted({t.value for t in OutType} | set(ONNX_OUT_TYPES)),
        default=None,
        help="tensor types of the output: gguf f32|f16|q8_0|q4_0|q4_k_m (default f16), onnx "
        "f32|int4 (default int4); the SPRM head is always kept exact",
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
    from edge_metastone.converters.convert import checkpoint_head_sidecar, convert

    if args.format == "onnx":
        return _run_onnx(args)
    outtype = args.outtype or OutType.F16.value
    if outtype not in {t.value for t in OutType}:
        raise BadCheckpointError(
            f"--outtype {outtype} is for --format onnx (gguf: f32|f16|q8_0|q4_0|q4_k_m)"
        )
    if args.head_only:
        path = checkpoint_head_sidecar(args.hf_dir, args.output)
        print(f"wrote SPRM head sidecar {path}", file=sys.stderr)
        return 0
    result = convert(args.hf_dir, args.output, outtype, progress=not args.no_progress)
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


def _run_onnx(args: argparse.Namespace) -> int:
    """Export an ONNX model directory."""
    outtype = args.outtype or "int4"
    if outtype not in ONNX_OUT_TYPES:
        raise BadCheckpointError(f"--outtype {outtype} is for GGUF (onnx: f32|int4)")
    if args.head_only:
        raise BadCheckpointError("--head-only writes a GGUF sidecar; it does not apply to onnx")
    try:
        from edge_metastone.converters.onnx_export import export_onnx
    except ImportError as e:
        raise BadCheckpointError(
            f"the ONNX export needs {e.name or e}: pip install 'edge-metastone[onnx-export]'"
        ) from None
    result = export_onnx(args.hf_dir, args.output, outtype)
    head = "with SPRM head (sprm_logits output)" if result.has_head else "NO SPRM head"
    print(
        f"wrote {result.path} (onnx {result.out_type}, {result.n_bytes / 2**20:.1f} MiB), {head}",
        file=sys.stderr,
    )
    return 0
