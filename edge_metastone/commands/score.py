"""`edge-metastone score [--model FILE.gguf] --text-file TEXT [--prompt QUESTION] [--json]`
(SPEC §3; docs/cli.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_metastone.commands import add_weight_buffers, print_json
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.sprm import SCORE_FLOOR, THINK_START


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "score", help="score the reasoning steps of one full text with the SPRM head"
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="FILE.gguf",
        help="a GGUF file or an ONNX model directory (default: the embedded model)",
    )
    p.add_argument(
        "--text-file",
        type=Path,
        required=True,
        metavar="TEXT",
        help="the text to score: a full chat transcript (with the template's markup and <think>), "
        "or, with --prompt, the model's answer alone",
    )
    p.add_argument(
        "--prompt",
        default=None,
        metavar="QUESTION",
        help="TEXT is the model's answer to QUESTION: the chat template is applied around it, as "
        "`reason` feeds the model (the head scores steps inside the <think> window)",
    )
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the head")
    p.add_argument(
        "--json", action="store_true", help="print {positions, step_scores, score, warnings}"
    )
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload when llama-cpp-python is built with CUDA/Metal (-1: all)",
    )
    add_weight_buffers(p)
    p.set_defaults(run=run)


def _floored(steps: list[float]) -> bool:
    """True when a step is at the trajectory score's floor: the geometric mean then measures
    nothing (each step is clamped to 1e-10)."""
    return any(s <= SCORE_FLOOR for s in steps)


def run(args: argparse.Namespace) -> int:
    """Score and print."""
    from edge_metastone.modelfile.about import about
    from edge_metastone.models import default_model_path
    from edge_metastone.runtime import open_backend

    try:
        text = args.text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeMetastoneError(f"cannot read {args.text_file}: {e}") from None
    model = args.model if args.model is not None else default_model_path()
    facts = about(model, args.head)
    warnings: list[str] = []
    backend = open_backend(
        model, head=args.head, n_gpu_layers=args.gpu_layers, weight_buffers=args.weight_buffers
    )
    try:
        if args.prompt is not None:
            prefix, _ = backend.encode_chat([{"role": "user", "content": args.prompt}])
            text = prefix + text
        elif THINK_START not in text:
            warnings.append(
                f"the text has no chat template (no {THINK_START}): its steps are scored outside "
                "the model's reasoning window, where the head was never trained; pass "
                "--prompt QUESTION to score it as the model's answer to QUESTION"
            )
        result = backend.score_text(text)
    finally:
        backend.close()
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print_json({**result.to_json(), "warnings": warnings})
        return 0
    label = facts.sprm_label
    print(f"{result.n_tokens} tokens, {len(result.positions)} scored steps ({label})")
    for pos, s in zip(result.positions, result.step_scores, strict=True):
        print(f"  step at token {pos:6d}: {s:.4g}")
    if not result.positions:
        print("trajectory score: none (no scored step)")
    elif _floored(result.step_scores):
        print(
            "trajectory score (geometric mean): ~0; a step scored at most 1e-10, and each step "
            f"is clamped there, so {result.score:.3g} is the clamp, not a measurement"
        )
    else:
        print(f"trajectory score (geometric mean): {result.score:.6f}")
    if not facts.head_informative:
        print(
            f"note: {label}: measured within-problem AUC {facts.head_auc_within:.2f} (0.5 is "
            "chance); `reason` shows the model's own step confidence instead"
        )
    return 0
