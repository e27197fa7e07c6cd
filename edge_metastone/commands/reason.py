"""`edge-metastone reason [--model FILE.gguf] [--effort low|medium|high|auto] [--seed N] [--json] PROMPT`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_metastone.scheduler import Effort
from edge_metastone.search import StrategyName


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "reason", help="answer a prompt with k scored candidates (test-time scaling)"
    )
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument(
        "--model", type=Path, default=None, help="model GGUF (default: the embedded model)"
    )
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the SPRM head")
    p.add_argument(
        "--effort",
        choices=[e.value for e in Effort],
        default=Effort.MEDIUM.value,
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload when llama-cpp-python is built with CUDA/Metal (-1: all)",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Reason and print."""
    from edge_metastone.reasoner import Reasoner, ReasonOptions

    with Reasoner(
        args.model, head=args.head, n_threads=args.threads, n_gpu_layers=args.gpu_layers
    ) as r:
        options = ReasonOptions(
            effort=args.effort,
            latency_budget=args.latency_budget,
            memory_budget=args.memory_budget,
            seed=args.seed,
            strategy=args.strategy,
            max_new_tokens=args.max_new_tokens,
            allow_degrade=args.allow_degrade,
        )
        result = r.reason(args.prompt, options)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    c = result.chosen_candidate
    print(result.answer if result.answer else "(no answer)")
    print(
        f"\n[{result.effort}: k={result.k}, {result.strategy}; chose candidate {result.chosen} "
        f"(score {c.score if c.score is not None else 'n/a'}, {c.tokens} tokens); "
        f"{result.timings.get('total_s', 0):.1f} s]",
        file=sys.stderr,
    )
    print(f"[scheduler: {result.scheduler_reason}]", file=sys.stderr)
    return 0
