"""Adaptive test-time compute against fixed efforts, on fresh problems of the embedded model.

    python bench/adaptive.py [--problems 300] [--seed 4242] [--out bench/results/adaptive]

Every policy runs live on the same problems with the same seeds (problem i samples candidate j
with seed (i, j)), one after another on the same engine and threads: one sample, low, medium and
high (k 2/8/32) with each fixed selector (log-probability, majority vote, confidence-weighted vote,
SPRM best-of-k, SPRM-weighted vote), adaptive at the model's recorded settings, and online
termination alone (waves 2 -> 32, never settling). For each: accuracy (with a 95% interval),
generated tokens and wall time, and their ratios to high's. Adaptive at every grid setting is then
replayed on high's own candidates (exact in tokens: tests/test_adaptive.py) for a Pareto curve,
and the live adaptive run is checked against its replay. Writes OUT.json and OUT.png (accuracy
against generated tokens, log x, the Pareto front marked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))
sys.path.insert(0, str(REPO))

from task import problems  # noqa: E402

from edge_metastone.reasoner import Reasoner  # noqa: E402
from edge_metastone.search.adaptive import Adaptive, AdaptiveSettings  # noqa: E402
from edge_metastone.search.base import (  # noqa: E402
    StrategyName,
    select_by_logprob,
    select_by_score,
)
from edge_metastone.search.confidence import VoteRule  # noqa: E402
from edge_metastone.search.logprob import LogProb  # noqa: E402
from edge_metastone.search.vote import Vote  # noqa: E402
from edge_metastone.training.adaptive_fit import RecordedRun, correct, evaluate, grid  # noqa: E402
from edge_metastone.types import GenerationSettings  # noqa: E402

FIXED = {"one sample": 1, "low": 2, "medium": 8, "high": 32}
LOGPROB = StrategyName.LOGPROB.value  # the selector of "one sample" and of the ratios' base


def selectors(backend):
    """Fixed selectors over one run's candidates: strategy name -> candidates -> chosen .index."""

    def vote(weighted: bool):
        return lambda cs: Vote(weighted=weighted).select(backend, cs, len(cs))[0]

    return {
        StrategyName.LOGPROB.value: select_by_logprob,
        StrategyName.VOTE.value: vote(weighted=False),
        StrategyName.CONFIDENCE_VOTE.value: VoteRule().choose,
        StrategyName.BEST_OF_K.value: select_by_score,
        StrategyName.WEIGHTED_VOTE.value: vote(weighted=True),
    }


def run_policy(strategy, backend, ids, k, sampling, settings):
    """One live request: (candidates, seconds)."""
    t0 = time.perf_counter()
    cands, early = strategy.run(backend, ids, k, sampling, settings)
    res = strategy.choose(backend, cands, k, early)
    return res, time.perf_counter() - t0


def interval(p: float, n: int) -> float:
    """Half-width of a 95% normal interval on a proportion."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def live(args, r: Reasoner, recorded: AdaptiveSettings):
    """Every policy on every problem; returns the table's rows and high's candidates."""
    backend, rows = r.backend, {}
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    online = AdaptiveSettings(waves=(2, 32), min_agree=10**6, consensus=1.0)
    high: list[RecordedRun] = []
    sel = selectors(backend)

    def add(name, ok, tokens, secs):
        row = rows.setdefault(name, {"correct": 0, "tokens": 0, "seconds": 0.0})
        row["correct"] += bool(ok)
        row["tokens"] += tokens
        row["seconds"] += secs

    for i, p in enumerate(problems(args.seed, args.problems)):
        _, ids = r.encode(p.prompt)
        sampling = dataclasses.replace(r.sampling, seed=i)
        gold = str(p.answer)
        for name, k in FIXED.items():
            res, secs = run_policy(LogProb(), backend, ids, k, sampling, settings)
            cands = res.candidates
            tokens = sum(c.n_tokens for c in cands)
            for sname, choose in sel.items() if k > 1 else [(LOGPROB, select_by_logprob)]:
                chosen = next(c for c in cands if c.index == choose(cands))
                add(f"{name} ({sname})" if k > 1 else name, correct(chosen, gold), tokens, secs)
            if k == 32:
                high.append(RecordedRun(cands, gold))
        for name, s in (("adaptive (recorded)", recorded), ("online termination alone", online)):
            res, secs = run_policy(Adaptive(s, LogProb()), backend, ids, 32, sampling, settings)
            add(name, correct(res.answer_candidate, gold), res.generated_tokens, secs)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{args.problems} problems", flush=True)
    return rows, high


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "adaptive")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT.png from OUT.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        d = json.loads(Path(f"{args.out}.json").read_text())
        plot(d["table"], d["replayed"], d["problems"], Path(f"{args.out}.png"))
        return
    with Reasoner() as r:
        recorded = AdaptiveSettings.from_json(r.backend.adaptive)
        print(
            f"{r.model_path.name}: T={r.sampling.temperature} top-p {r.sampling.top_p}, "
            f"threads {r.n_threads}, max_new_tokens {args.max_new_tokens}; {args.problems} fresh "
            f"problems (seed {args.seed}); recorded adaptive: {recorded.to_json()}"
        )
        rows, high = live(args, r, recorded)
    n = args.problems
    base = rows[f"high ({LOGPROB})"]
    table = []
    print(
        f"\n{'policy':38s} {'accuracy':>15s} {'tokens':>9s} {'x high':>7s} {'wall s':>8s} {'x high':>7s}"
    )
    for name, row in rows.items():
        acc = row["correct"] / n
        t_ratio, s_ratio = row["tokens"] / base["tokens"], row["seconds"] / base["seconds"]
        table.append(
            {
                "policy": name,
                "accuracy": acc,
                "ci95": interval(acc, n),
                **row,
                "tokens_x_high": t_ratio,
                "seconds_x_high": s_ratio,
            }
        )
        print(
            f"{name:38s} {acc:8.3f} ±{interval(acc, n):.3f} {row['tokens']:9d} {t_ratio:7.3f} "
            f"{row['seconds']:8.1f} {s_ratio:7.3f}"
        )
    curve = []
    for s in grid():
        out = evaluate(high, s, LogProb())
        curve.append(
            {
                "settings": json.loads(s.to_json()),
                "accuracy": out.accuracy,
                "tokens": out.tokens,
                "mean_candidates": out.mean_candidates,
            }
        )
    rec = evaluate(high, recorded, LogProb())
    live_rec = rows["adaptive (recorded)"]
    print(
        f"\nreplay of the recorded setting on high's candidates: accuracy {rec.accuracy:.3f}, "
        f"{rec.tokens} tokens (live: {live_rec['correct'] / n:.3f}, {live_rec['tokens']})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(
        json.dumps(
            {
                "problems": n,
                "seed": args.seed,
                "table": table,
                "replayed": curve,
                "recorded": json.loads(recorded.to_json()),
            },
            indent=1,
        )
    )
    plot(table, curve, n, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.json and {args.out}.png")


# strategy -> (legend label, marker, colour, x offset factor so equal-k points do not overlap)
SERIES = {
    StrategyName.LOGPROB.value: ("logprob", "o", "#1f77b4", 0.94),
    StrategyName.VOTE.value: ("majority", "s", "#2ca02c", 0.97),
    StrategyName.CONFIDENCE_VOTE.value: ("confidence-vote", "D", "#9467bd", 1.0),
    StrategyName.BEST_OF_K.value: ("sprm", "v", "#8c564b", 1.03),
    StrategyName.WEIGHTED_VOTE.value: ("sprm-vote", "^", "#e377c2", 1.06),
}


def plot(table, curve, n, path: Path) -> None:
    """Accuracy against generated tokens (log x): one series per fixed selector, adaptive and
    online termination apart, the replayed grid in grey, and the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 7.5))
    ax.scatter(
        [c["tokens"] for c in curve],
        [c["accuracy"] for c in curve],
        s=12,
        c="#bbb",
        label="adaptive, other grid settings (replayed)",
        zorder=1,
    )
    for sel, (label, marker, colour, dx) in SERIES.items():
        rows = [r for r in table if r["policy"].endswith(f"({sel})")]
        ax.errorbar(
            [r["tokens"] * dx for r in rows],
            [r["accuracy"] for r in rows],
            yerr=[r["ci95"] for r in rows],
            fmt=marker,
            color=colour,
            ms=6,
            capsize=2,
            label=f"low / medium / high: {label}",
            zorder=3,
        )
    for name, marker, colour in (
        ("one sample", "o", "#000"),
        ("adaptive (recorded)", "*", "#d62728"),
        ("online termination alone", "X", "#ff7f0e"),
    ):
        r = next(r for r in table if r["policy"] == name)
        ax.errorbar(
            [r["tokens"]],
            [r["accuracy"]],
            yerr=[r["ci95"]],
            fmt=marker,
            color=colour,
            ms=11 if marker == "*" else 7,
            capsize=2,
            label=name,
            zorder=4,
        )
    for label, k in (("low k=2", "low"), ("medium k=8", "medium"), ("high k=32", "high")):
        t = next(r["tokens"] for r in table if r["policy"].startswith(k))
        ax.annotate(label, (t, 0.79), ha="center", fontsize=9, color="#555")
    pts = sorted(
        [(r["tokens"], r["accuracy"]) for r in table]
        + [(c["tokens"], c["accuracy"]) for c in curve]
    )
    front, best = [], -1.0
    for t, a in pts:
        if a > best:
            front.append((t, a))
            best = a
    ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_ylim(0.55, 0.80)
    ax.set_xlabel("generated tokens over all problems (log scale)")
    ax.set_ylabel(f"accuracy, span 0.55-0.80 ({n} problems; bars: 95% interval)")
    ax.set_title("MetaStone-nano, fresh problems: accuracy against generated tokens")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
