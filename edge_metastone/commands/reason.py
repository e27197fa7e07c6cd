"""`edge-metastone reason [--model FILE.gguf] [--effort low|medium|high|auto] [--seed N] [--json] PROMPT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_metastone.commands import (
    add_stop,
    add_threads_and_gpu,
    add_weight_buffers,
    open_reasoner,
    print_json,
    stop_strings,
)
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.modelfile.about import ModelAbout
from edge_metastone.models.arithmetic import DOMAIN
from edge_metastone.scheduler import Effort
from edge_metastone.search.base import StrategyName
from edge_metastone.sprm import SCORE_FLOOR
from edge_metastone.types import KVType

if TYPE_CHECKING:
    from edge_metastone.options import ReasonOptions


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "reason",
        help="answer a prompt with k scored candidates (test-time scaling)",
        description="Answer a prompt with k candidates and pick one. Without --model it runs the "
        f"embedded MetaStone-nano, which can do {DOMAIN} (e.g. 'What is (17+25)*3-40?'); it "
        "answers any other prompt with a number all the same, so such a prompt gets a warning.",
    )
    p.add_argument("prompt", metavar="PROMPT", nargs="?", help="the question ('-': read stdin)")
    p.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from a file")
    add_reason_options(p)
    add_recalibrate(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(run=run)


def add_recalibrate(p: argparse.ArgumentParser) -> None:
    """The `--recalibrate` flag of `reason` and `serve`."""
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure this machine again before the first request (see `edge-metastone calibrate`)",
    )


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
        help="low/medium/high = k 2/8/32 (default medium); adaptive = waves of candidates until "
        "the answer is settled (the model's recorded settings, up to 32); auto = the highest "
        "that fits the budgets (adaptive where the model measured it as accurate as high)",
    )
    p.add_argument(
        "--strategy",
        choices=[s.value for s in StrategyName],
        default=None,
        help="default: the selector recorded in the model file (metastone.default_strategy; "
        "logprob for the embedded model), else best-of-k by SPRM score (logprob without a head)",
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
    add_sampling(p)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per candidate (default: the model's own: its task's answer length, 160 for "
        "the embedded model; 1024 for a model without one)",
    )
    add_stop(p)
    add_threads_and_gpu(p)
    add_weight_buffers(p)


def add_sampling(p: argparse.ArgumentParser) -> None:
    """How tokens are drawn (llama.cpp's sampler chain: top-k, top-p, min-p, temperature); each
    defaults to the model's recommended sampling (MetaStone's T 0.6, top-p 0.95)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0: greedy (default 0.6)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.95)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k likeliest (default 0: off)")
    g.add_argument("--min-p", type=float, default=None, help="llama.cpp's min-p (default 0: off)")
    p.add_argument(
        "--think-budget",
        type=int,
        default=None,
        metavar="N",
        help="tokens each candidate may think; then its </think> is written for it and it "
        "answers (a model with <think> tokens only)",
    )
    p.add_argument(
        "--think-budget-message",
        default="",
        metavar="TEXT",
        help="text written before that </think> (e.g. 'Time is up, the answer:')",
    )
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="an explicit number of candidates (with low/medium/high: it replaces the preset's k)",
    )


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
        "stop": stop_strings(args),
        "cache_prompt": getattr(args, "cache_prompt", False),
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "k": args.k,
        "think_budget": args.think_budget,
        "think_budget_message": args.think_budget_message,
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
    from edge_metastone.commands.calibrate import ProgressBar

    prompt = read_prompt(args)
    options = reason_options(args)
    with open_reasoner(args, on_calibration=ProgressBar()) as r:
        if args.recalibrate:
            r.calibration(refresh=True)
        facts = r.about
        for w in r.prompt_warnings(prompt, raw=args.raw):  # before the wait, not after it
            print(f"warning: {w}", file=sys.stderr)
        result = r.reason(prompt, options)
    if args.json:
        print_json(result.reason_json(), ensure_ascii=False)
        return 0
    print(format_result(result, facts))
    return 0


def _chosen_by(result) -> str:
    """The selector and the number it used for the chosen candidate."""
    c = result.chosen_candidate
    name = StrategyName(result.strategy)
    if name.signal == "logprob" or (c.score is None and c.mean_logprob is not None):
        return f"{name.value}: mean token log-prob {_logprob(c)}, the highest of {result.k}"
    if name.is_vote:
        n = sum(x.answer == c.answer for x in result.candidates)
        return f"{name.value}: {n} of {result.k} candidates answer {c.answer or '(none)'}"
    if name is StrategyName.COMBINED:
        return (
            f"{name.value} (the head with the model's log-probability): SPRM score {_sprm(c)}, "
            f"mean token log-prob {_logprob(c)}"
        )
    return f"{name.value}: SPRM score {_sprm(c)}"


def _short(text: str, width: int = 24) -> str:
    text = " ".join(text.split()) or "(none)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _sprm(c) -> str:
    """A candidate's SPRM trajectory score; a geometric mean with a step at the floor is not a
    measurement: shown as ~0."""
    if c.score is None:
        return "n/a"
    if any(s <= SCORE_FLOOR for s in c.step_scores):
        return "~0"
    return f"{c.score:.3g}"


def _least_sure(c) -> str:
    conf = [x for x in c.step_confidence if x is not None]
    return f"{min(conf):.3f}" if conf else "n/a"


def _logprob(c) -> str:
    return f"{c.mean_logprob:.3f}" if c.mean_logprob is not None else "n/a"


def format_result(result, facts: ModelAbout | None = None) -> str:
    """The chosen answer and every candidate's answer, the number the selector chose by, the
    model's confidence in its least sure step, the SPRM score (labelled where the model's head
    was measured uninformative), and the timings, for a person."""
    facts = facts or ModelAbout()
    sprm = "SPRM" if facts.head_informative else "SPRM*"
    lines = [result.answer if result.answer else "(no answer)", ""]
    lines.append(
        f"  {'cand':>4}  {'answer':<24}  {'log-prob':>8}  {'least-sure':>10}  {sprm:>6}"
        f"  {'steps':>5}  {'tokens':>6}  end"
    )
    for c in result.candidates:
        mark = "*" if c.index == result.chosen else " "
        lines.append(
            f"{mark} {c.index:>4}  {_short(c.answer):<24}  {_logprob(c):>8}  {_least_sure(c):>10}"
            f"  {_sprm(c):>6}  {len(c.step_scores):>5}  {c.tokens:>6}  {c.finish_reason}"
        )
    lines += ["", f"chosen by {_chosen_by(result)}"]
    lines.append(
        "log-prob: mean token log-probability; least-sure: the model's confidence in its least "
        "sure step (geometric-mean probability of the step's tokens)"
    )
    if not facts.head_informative:
        auc = facts.head_auc_within or 0.0
        lines.append(
            f"SPRM*: {facts.sprm_label}: its head separated right from wrong candidates of a "
            f"problem with AUC {auc:.2f} when measured (0.5 is chance)"
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
    if result.waves:
        ws = ", ".join(f"{w['candidates']} ({w['tokens']} tokens)" for w in result.waves)
        lines.append(f"[adaptive: candidates after each wave: {ws}; {result.stop_reason}]")
    stopped = [c for c in result.candidates if c.stopped_early]
    if stopped:
        lines.append(
            f"[stopped early: {', '.join(f'{c.index} ({c.stopped_early})' for c in stopped)}]"
        )
    cal = result.calibration
    if cal.get("seconds"):
        lines.append(
            f"[calibration {cal['status']} first, in {cal['seconds']:.1f} s, not counted in the "
            "latency budget" + ("" if cal.get("verified", True) else "; not cached") + "]"
        )
    return "\n".join(lines)
