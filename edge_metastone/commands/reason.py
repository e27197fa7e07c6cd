"""`edge-metastone reason [--model FILE.gguf] [--effort low|medium|high|auto] [--seed N] [--json] PROMPT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_metastone.commands import add_weight_buffers, print_json
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.scheduler import Effort
from edge_metastone.search.base import StrategyName
from edge_metastone.types import KVType

if TYPE_CHECKING:
    from edge_metastone.options import ReasonOptions


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "reason", help="answer a prompt with k scored candidates (test-time scaling)"
    )
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="the question ('-': read stdin)")
    p.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from a file")
    add_reason_options(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(run=run)


def add_reason_options(
    p: argparse.ArgumentParser, effort_default: str | None = Effort.MEDIUM.value
) -> None:
    """The request options `reason` and `batch` share (they map 1:1 to `ReasonOptions`)."""
    p.add_argument(
        "--raw",
        action="store_true",
        help="the prompt is pre-rendered text: fed as is, its control-token markup parsed "
        "(default: the prompt is a user message; text in it never becomes control tokens)",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="model GGUF (default: the embedded model)"
    )
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the SPRM head")
    p.add_argument(
        "--effort",
        choices=[e.value for e in Effort],
        default=effort_default,
        help="low/medium/high = k 2/8/32 (default medium); auto = highest that fits the budgets",
    )
    p.add_argument(
        "--strategy",
        choices=[s.value for s in StrategyName],
        default=None,
        help="default: best-of-k by SPRM score (logprob without a head)",
    )
    p.add_argument("--latency-budget", type=float, default=None, metavar="SECONDS")
    p.add_argument("--memory-budget", type=float, default=None, metavar="MB")
    p.add_argument(
        "--allow-degrade",
        action="store_true",
        help="run a single candidate when no effort mode fits the budgets",
    )
    p.add_argument(
        "--kv-cache",
        choices=[t.value for t in KVType],
        default=None,
        help="KV cache element type (default f16, or q8_0 when a --memory-budget needs it)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload when llama-cpp-python is built with CUDA/Metal (-1: all)",
    )
    add_weight_buffers(p)


def reason_options(args: argparse.Namespace, **changes: Any) -> ReasonOptions:
    """The `ReasonOptions` the shared flags describe (`changes` override fields)."""
    from edge_metastone.options import ReasonOptions

    fields = {
        "effort": args.effort,
        "latency_budget": args.latency_budget,
        "memory_budget": args.memory_budget,
        "seed": args.seed,
        "strategy": args.strategy,
        "max_new_tokens": args.max_new_tokens,
        "allow_degrade": args.allow_degrade,
        "raw": args.raw,
        "kv_cache": args.kv_cache,
    }
    return ReasonOptions(**{**fields, **changes})


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from PROMPT, `-` (stdin) or --prompt-file; exactly one of them."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise EdgeMetastoneError("give the prompt as PROMPT, '-' (stdin) or --prompt-file FILE")
    try:
        if args.prompt_file is not None:
            return args.prompt_file.read_text(encoding="utf-8")
        if args.prompt == "-":
            return sys.stdin.buffer.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeMetastoneError(f"cannot read the prompt: {e}") from None
    return args.prompt


def run(args: argparse.Namespace) -> int:
    """Reason and print."""
    from edge_metastone.reasoner import Reasoner

    prompt = read_prompt(args)
    options = reason_options(args)
    with Reasoner(
        args.model, head=args.head, n_threads=args.threads, n_gpu_layers=args.gpu_layers
    ) as r:
        result = r.reason(prompt, options)
    if args.json:
        print_json(result.to_json(), ensure_ascii=False)
        return 0
    print(format_result(result))
    return 0


def _short(text: str, width: int = 24) -> str:
    text = " ".join(text.split()) or "(none)"
    return text if len(text) <= width else text[: width - 3] + "..."


def format_result(result) -> str:
    """The chosen answer, every candidate's answer and score, and the timings, for a person."""
    lines = [result.answer if result.answer else "(no answer)", ""]
    lines.append(f"  {'cand':>4}  {'answer':<24}  {'score':>6}  {'steps':>5}  {'tokens':>6}  end")
    for c in result.candidates:
        mark = "*" if c.index == result.chosen else " "
        score = f"{c.score:.3g}" if c.score is not None else "n/a"
        lines.append(
            f"{mark} {c.index:>4}  {_short(c.answer):<24}  {score:>6}  {len(c.step_scores):>5}"
            f"  {c.tokens:>6}  {c.finish_reason}"
        )
    t = result.timings
    tokens = sum(c.tokens for c in result.candidates)
    rate = tokens / t["decode_s"] if t.get("decode_s") else 0.0
    lines += [
        "",
        f"[{result.effort}: k={result.k}, {result.strategy}; chose candidate {result.chosen}; "
        f"{tokens} tokens in {t.get('total_s', 0.0):.2f} s ({rate:.0f} tokens/s decoding), "
        f"prefill {t.get('prefill_s', 0.0) * 1e3:.0f} ms"
        + (f"; KV {t['kv_layout']} {t.get('kv_type', '')}".rstrip() if t.get("kv_layout") else "")
        + (f"; weights {t['weight_buffers']}" if t.get("weight_buffers") else "")
        + "]",
        f"[scheduler: {result.scheduler_reason}]",
    ]
    return "\n".join(lines)
