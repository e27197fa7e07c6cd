"""Test-time scaling on the embedded MetaStone-nano, on a fresh held-out set.

    python bench/nano_eval.py [--model FILE.gguf] [--problems 200] [--seed 777] [--png OUT.png]

For each effort mode (low/medium/high = k 2/8/32) it runs the real `Reasoner` (the model's default
sampling and selector) once per problem, then scores the *same* candidates with every selector:
the default one, SPRM best-of-k, majority vote and mean log-probability. It prints the accuracy of
one sample (the mean over candidates), each selector's accuracy at that k, the oracle pass@k and the
SPRM's within-problem AUC, and writes a PNG of accuracy against total generated tokens (log scale),
one line per selector.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))
sys.path.insert(0, str(REPO))

from task import problems  # noqa: E402

from edge_metastone.options import ReasonOptions  # noqa: E402
from edge_metastone.reasoner import Reasoner  # noqa: E402
from edge_metastone.search.base import StrategyName  # noqa: E402
from edge_metastone.training.metrics import (  # noqa: E402
    CHOOSERS,
    auc_report,
    samples_from_result,
    selection_report,
)

EFFORTS = ("low", "medium", "high")
# "default": what the Reasoner chose (the model's default strategy); the others by strategy name
SHOWN = (
    "default",
    StrategyName.BEST_OF_K.value,
    StrategyName.VOTE.value,
    StrategyName.LOGPROB.value,
)
LABELS = {  # column -> its header in the printed table and its name in the plot's legend
    StrategyName.BEST_OF_K.value: "sprm",
    StrategyName.VOTE.value: "majority",
}


def run(args: argparse.Namespace) -> dict:
    """Evaluate every effort; returns the table (also printed)."""
    probs = problems(args.seed, args.problems)
    table: dict[str, dict] = {}
    with Reasoner(args.model, max_new_tokens=args.max_new_tokens, n_threads=args.threads) as r:
        default = r.default_strategy.value
        sampling = r.sampling
        print(
            f"model {r.model_path.name}: default selector {default}; sampling T={sampling.temperature} "
            f"top-p {sampling.top_p}; {len(probs)} held-out problems (seed {args.seed}); "
            f"threads {r.n_threads}; max_new_tokens {args.max_new_tokens}",
            flush=True,
        )
        for effort in EFFORTS:
            samples, chosen_right, tokens = [], [], 0
            t0 = time.perf_counter()
            for i, p in enumerate(probs):
                res = r.reason(p.prompt, ReasonOptions(effort=effort, seed=i, logprobs=True))
                s = samples_from_result(res, str(p.answer))
                samples.append(s)
                chosen_right.append(s.correct[res.chosen])  # the default selector's pick
                tokens += sum(c.tokens for c in res.candidates)
            sel = selection_report(samples)
            aucs = auc_report(samples)
            k = len(samples[0].correct)
            row = {
                "k": k,
                "single": sel["random"],
                "default": float(np.mean(chosen_right)),
                **{name.value: sel[name.value] for name in CHOOSERS},
                "oracle": sel["oracle"],
                "sprm_auc_within": aucs["trajectory_auc_within"],
                "step_auc_within": aucs["step_auc_within"],
                "logprob_auc_within": aucs["logprob_auc_within"],
                "tokens": tokens,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            table[effort] = row
            print(json.dumps({"effort": effort, **row}), flush=True)
    return {"default": default, "table": table, "problems": len(probs), "seed": args.seed}


def print_table(res: dict) -> None:
    """The accuracy table."""
    cols = ("k", "single", *SHOWN, "oracle", "sprm_auc_within")
    print(f"\ndefault selector = {res['default']}")
    print(f"{'effort':<8}" + "".join(f"{LABELS.get(c, c):>17}" for c in cols) + f"{'tokens':>10}")
    for effort, row in res["table"].items():
        cells = "".join(
            f"{row[c]:>17}"
            if isinstance(row[c], int)
            else f"{row[c]:>17.3f}"
            if row[c] is not None
            else f"{'n/a':>17}"
            for c in cols
        )
        print(f"{effort:<8}{cells}{row['tokens']:>10}")


def plot(res: dict, path: Path) -> None:
    """Accuracy against total generated tokens (log scale), one line per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [res["table"][e] for e in EFFORTS if e in res["table"]]
    x = [row["tokens"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in zip(SHOWN, ("o-", "s--", "^-.", "d:"), strict=True):
        label = f"default ({res['default']})" if name == "default" else LABELS.get(name, name)
        ax.plot(x, [row[name] for row in rows], style, label=label)
    ax.plot(x, [row["oracle"] for row in rows], "x:", color="grey", label="oracle pass@k")
    ax.axhline(rows[0]["single"], color="black", lw=0.8, ls="--", label="one sample")
    for xi, row, effort in zip(x, rows, EFFORTS, strict=False):
        ax.annotate(f"{effort} k={row['k']}", (xi, row["oracle"]), fontsize=8, ha="center",
                    xytext=(0, 5), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("total generated tokens over all problems (log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"MetaStone-nano test-time scaling ({res['problems']} held-out problems)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--seed", type=int, default=777, help="held-out set seed (training used 0-2)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--png", type=Path, default=Path("nano_scaling.png"))
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = ap.parse_args(argv)
    res = run(args)
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    plot(res, args.png)


if __name__ == "__main__":
    main()
