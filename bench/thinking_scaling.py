"""The scaling law on the embedded model: accuracy over candidates (k) x thinking budget, against the
total thinking tokens actually spent; and `--effort auto` choosing both axes from it.

    python bench/thinking_scaling.py [--problems 300] [--seed 5151] [--out bench/results/thinking_scaling]
    python bench/thinking_scaling.py --record OUT.gguf [--seed 2]      # the model file's table
    python bench/thinking_scaling.py --auto 0.3,0.6 [--problems 200] [--seed 6161]
    python bench/thinking_scaling.py --plot-only

Grid: for each thinking budget (default 8, 12, 16, 24, 32 tokens and unlimited; the embedded
model's thoughts are 15-43 tokens, median 24), every problem generates 32 candidates in one batch (problem i
samples candidate j with seed (i, j): candidate j is the same in a run of any k > j,
tests/test_adaptive.py). A point (k, budget) is measured on the 32/k disjoint groups of k
candidates of every problem (group 0 is what `reason --k k` runs; the others are the same draw
with other seeds), chosen by the model's default selector and by majority vote. Per point:
accuracy, thinking tokens (inside <think>) and generated tokens per problem, and `steps`, the 90th
percentile over the groups of their longest candidate (what a batch's latency follows).

The compute axis is every generated token, not only those inside <think>: a candidate whose
thought is ended for it may go on computing in its answer (the embedded model does), and counting
only its think window would credit the budget with savings it does not make. It prints the grid,
marks the Pareto front (no other point is more accurate with fewer generated tokens), fits
accuracy = a + b ln(generated tokens per problem) over every point and over the unlimited points
(the k axis alone), with R^2, and draws OUT.png (log x). `--record` measures the grid on the validation split and writes the
model copy with `metastone.thinking_scaling` (docs/model-file.md). `--auto` runs `--effort auto`
under a latency budget on fresh problems three ways, with the same file's weights: without a table
(today's k-only choice, worst-case lengths), with the table's unlimited-thinking points only (k
alone, measured lengths) and with the whole table (k and the thinking budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))
sys.path.insert(0, str(REPO))

from task import problems  # noqa: E402

from edge_metastone import keys  # noqa: E402
from edge_metastone.modelfile.copy import write_model_copy  # noqa: E402
from edge_metastone.options import ReasonOptions  # noqa: E402
from edge_metastone.reasoner import Reasoner, think_settings  # noqa: E402
from edge_metastone.search import make_strategy  # noqa: E402
from edge_metastone.search.base import StrategyName  # noqa: E402
from edge_metastone.search.vote import Vote  # noqa: E402
from edge_metastone.thinking_scaling import ScalingPoint, ScalingTable  # noqa: E402
from edge_metastone.training.adaptive_fit import correct  # noqa: E402
from edge_metastone.types import GenerationSettings  # noqa: E402

KS = (1, 2, 4, 8, 16, 32)
BUDGETS = (8, 12, 16, 24, 32, None)
OUT = REPO / "bench" / "results" / "thinking_scaling"
# a row's "accuracy" is the default selector's; its VOTE ("vote") the majority vote's
VOTE = StrategyName.VOTE.value


def thought_tokens(c, think_end: int) -> int:
    """Tokens a candidate wrote inside its think window (the prompt opens it)."""
    ids = c.token_ids
    return ids.index(think_end) if think_end in ids else len(ids)


def collect(r: Reasoner, seed: int, n: int, budget: int | None, max_new: int) -> list[dict]:
    """32 candidates per problem under `budget`: per problem the gold answer and, per candidate,
    what the grid needs (right, generated and thinking tokens, forced end, and the candidate)."""
    settings = think_settings(
        r.backend, ReasonOptions(think_budget=budget), GenerationSettings(max_new_tokens=max_new)
    )
    settings = dataclasses.replace(settings, logprobs=True)
    end = r.backend.rule.think_end_id
    out = []
    for i, p in enumerate(problems(seed, n)):
        _, ids = r.encode(p.prompt)
        sampling = dataclasses.replace(r.sampling, seed=i)
        cands = r.backend.generate_all(ids, 32, sampling, settings)
        gold = str(p.answer)
        out.append(
            {
                "gold": gold,
                "cands": cands,
                "right": [correct(c, gold) for c in cands],
                "tokens": [c.n_tokens for c in cands],
                "thought": [thought_tokens(c, end) for c in cands],
                "forced": [c.thought_ended for c in cands],
            }
        )
    return out


def grid_points(r: Reasoner, data: dict, selector_name: str) -> list[dict]:
    """Every (k, budget) point of the collected data, by the default selector ("accuracy") and
    by majority vote (VOTE)."""
    chooser = make_strategy(selector_name)
    vote = Vote()
    rows = []
    for budget, probs in data.items():
        for k in KS:
            right = {"default": [], VOTE: []}
            steps, tokens, thought, forced = [], [], [], []
            for p in probs:
                for g in range(32 // k):
                    sl = slice(g * k, (g + 1) * k)
                    cands = p["cands"][sl]
                    for name, sel in (("default", chooser), (VOTE, vote)):
                        best = sel.select(r.backend, cands, k)[0]
                        right[name].append(p["right"][sl][[c.index for c in cands].index(best)])
                    steps.append(max(p["tokens"][sl]))
                tokens.append(statistics.fmean(p["tokens"]))
                thought.append(statistics.fmean(p["thought"]))
                forced.append(statistics.fmean(p["forced"]))
            rows.append(
                {
                    "k": k,
                    "think_budget": budget,
                    "accuracy": statistics.fmean(right["default"]),
                    VOTE: statistics.fmean(right[VOTE]),
                    "steps": int(sorted(steps)[int(0.9 * (len(steps) - 1))]),
                    "tokens": statistics.fmean(tokens),
                    "thought": statistics.fmean(thought),
                    "forced_share": statistics.fmean(forced),
                    "thinking_per_problem": k * statistics.fmean(thought),
                    "generated_per_problem": k * statistics.fmean(tokens),
                    "groups": len(probs) * (32 // k),
                }
            )
    return rows


X = "generated_per_problem"  # the compute axis: every token generated (see the docstring)


def pareto(rows: list[dict], acc: str = "accuracy") -> list[dict]:
    """The points no other point beats on accuracy with fewer (or equal) generated tokens."""
    front, best = [], -1.0
    for row in sorted(rows, key=lambda r: (r[X], -r[acc])):
        if row[acc] > best:
            front.append(row)
            best = row[acc]
    return front


def fit_log(rows: list[dict]) -> dict:
    """Least squares accuracy = a + b ln(generated tokens per problem), with R^2."""
    xs = [math.log(r[X]) for r in rows]
    ys = [r["accuracy"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0, "points": len(rows)}


def fits(rows: list[dict]) -> dict:
    """The log fit over every point, and over the unlimited-thinking points (the k axis)."""
    return {
        "every point": fit_log(rows),
        "unlimited thinking (k alone)": fit_log([r for r in rows if r["think_budget"] is None]),
    }


def measure(r: Reasoner, seed: int, n: int, budgets, max_new: int) -> tuple[list[dict], dict]:
    """The grid's rows and what they were measured with."""
    data = {}
    for b in budgets:
        t0 = time.perf_counter()
        data[b] = collect(r, seed, n, b, max_new)
        print(f"  budget {b if b is not None else 'unlimited'}: {time.perf_counter() - t0:.0f} s")
    rows = grid_points(r, data, r.default_strategy.value)
    meta = {
        "model": r.model_path.name,
        "problems": n,
        "seed": seed,
        "max_new_tokens": max_new,
        "selector": r.default_strategy.value,
        "sampling": {"temperature": r.sampling.temperature, "top_p": r.sampling.top_p},
        "threads": r.n_threads,
    }
    return rows, meta


def print_grid(rows: list[dict], fit: dict) -> None:
    """The table, the front marked with *."""
    front = {(r["k"], r["think_budget"]) for r in pareto(rows)}
    print(
        f"\n{'k':>3} {'budget':>9} {'accuracy':>9} {'majority':>9} {'thinking/problem':>17} "
        f"{'generated/problem':>18} {'forced':>7} {'steps p90':>9}"
    )
    for r in rows:
        b = r["think_budget"] if r["think_budget"] is not None else "unlimited"
        mark = " *" if (r["k"], r["think_budget"]) in front else ""
        print(
            f"{r['k']:3d} {b!s:>9} {r['accuracy']:9.3f} {r[VOTE]:9.3f} "
            f"{r['thinking_per_problem']:17.1f} {r['generated_per_problem']:18.1f} "
            f"{r['forced_share']:7.2f} {r['steps']:9d}{mark}"
        )
    for name, f in fit.items():
        print(
            f"fit over {name} ({f['points']} points): accuracy = {f['a']:.3f} + {f['b']:.4f} "
            f"ln(generated tokens per problem), R^2 = {f['r2']:.3f}"
        )
    print("* = Pareto front (accuracy against generated tokens)")


def table_of(rows: list[dict], meta: dict, unlimited_only: bool = False) -> ScalingTable:
    """The model-file table from the grid's rows."""
    names = ("k", "think_budget", "accuracy", "steps", "tokens", "thought")
    pts = tuple(
        ScalingPoint(**{f: round(r[f], 4) if isinstance(r[f], float) else r[f] for f in names})
        for r in rows
        if not unlimited_only or r["think_budget"] is None
    )
    measured = {f: meta[f] for f in ("problems", "seed")}
    return ScalingTable(pts, meta["selector"], meta["max_new_tokens"], measured)


def auto_compare(args) -> None:
    """`--effort auto` under each latency budget of `args.auto`, three ways, on the same fresh
    problems and seeds, with one calibration (measured once, given to every way)."""
    src = Path(args.model) if args.model else None
    with Reasoner(src) as r:
        src = r.model_path
        table = ScalingTable.from_json(r.backend.thinking_scaling)
        cal = r.calibration(refresh=True)
        _, ids = r.encode(problems(args.seed, 1)[0].prompt)
        print(
            f"every way: {src.name}'s weights, threads {r.n_threads}, T={r.sampling.temperature} "
            f"top-p {r.sampling.top_p}, max_new_tokens {r.max_new_tokens}, problem i seed i, "
            "one calibration"
        )
    if table is None:
        raise SystemExit(f"{src} has no {keys.THINKING_SCALING}: run --record first")
    budgets = [float(x) for x in args.auto.split(",")]
    out: dict = {"problems": args.problems, "seed": args.seed, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "k only, no table (today)": write_model_copy(
                src, Path(tmp) / "none.gguf", extra={keys.THINKING_SCALING: ""}
            ),
            "k only, the table's unlimited points": write_model_copy(
                src,
                Path(tmp) / "unlimited.gguf",
                extra={keys.THINKING_SCALING: _unlimited(table).to_json()},
            ),
            "k and thinking budget (the table)": src,
        }
        for limit in budgets:
            print(f"\n--effort auto --latency-budget {limit} on {args.problems} fresh problems:")
            with Reasoner(src, calibration=cal) as r:
                high = r.plan(len(ids), effort="high", latency_budget=limit)
                print(f"  (high at this prompt: {high.reason})")
            for name, path in files.items():
                res = _auto_run(path, args, limit, cal)
                out["runs"].setdefault(str(limit), {})[name] = res
                print(
                    f"  {name:38s} accuracy {res['accuracy']:.3f}, mean {res['seconds']:.3f} s, "
                    f"over the budget {res['over']}, stopped early {res['early']}, "
                    f"chose {res['chose']}",
                    flush=True,
                )
    path = Path(f"{args.out}_auto.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def _unlimited(t: ScalingTable) -> ScalingTable:
    pts = tuple(p for p in t.points if p.think_budget is None)
    return dataclasses.replace(t, points=pts)


def _auto_run(path: Path, args, limit: float, cal) -> dict:
    """One way: every problem through `Reasoner.reason` (effort auto, the latency budget, one
    candidate allowed when nothing fits)."""
    right, secs, over, early, chose = 0, [], 0, 0, {}
    with Reasoner(path, calibration=cal) as r:
        o = ReasonOptions(effort="auto", latency_budget=limit, allow_degrade=True)
        r.reason("What is 2+3?", o)  # warm: the first request's one-off costs outside the timing
        for i, p in enumerate(problems(args.seed, args.problems)):
            t0 = time.perf_counter()
            res = r.reason(p.prompt, dataclasses.replace(o, seed=i))
            dt = time.perf_counter() - t0
            secs.append(dt)
            over += dt > limit
            early += res.early_stop
            right += correct(res.chosen_candidate, str(p.answer))
            key = f"{res.effort} k={res.k}" + (
                f" budget {res.think_budget}" if res.think_budget is not None else ""
            )
            chose[key] = chose.get(key, 0) + 1
    n = args.problems
    return {
        "accuracy": right / n,
        "seconds": statistics.fmean(secs),
        "over": over,
        "early": early,
        "chose": chose,
    }


COLOURS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725", "#d62728", "#ff7f0e")


def plot(rows: list[dict], fit: dict, meta: dict, path: Path) -> None:
    """Accuracy against generated tokens per problem (log x): one line per thinking budget over k
    (labels: k), majority hollow, the Pareto front dashed, the two log fits dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 7))
    budgets = list(dict.fromkeys(r["think_budget"] for r in rows))
    for colour, b in zip(COLOURS, budgets, strict=False):
        pts = [r for r in rows if r["think_budget"] == b]
        xs = [r[X] for r in pts]
        label = "unlimited thinking" if b is None else f"thinking budget {b} tokens"
        ax.plot(xs, [r["accuracy"] for r in pts], "o-", color=colour, ms=5, lw=1, label=label)
        ax.plot(xs, [r[VOTE] for r in pts], "o", mfc="none", color=colour, ms=8, lw=0)
        for r in pts:
            ax.annotate(
                f"{r['k']}", (r[X], r["accuracy"]), fontsize=7, xytext=(3, 3),
                textcoords="offset points", color=colour,
            )  # fmt: skip
    front = pareto(rows)
    ax.plot(
        [r[X] for r in front], [r["accuracy"] for r in front], "k--", lw=1.2,
        label="Pareto front (default selector)",
    )  # fmt: skip
    xs = sorted(r[X] for r in rows)
    for (name, f), style in zip(fit.items(), (":", "-."), strict=True):
        ax.plot(
            xs, [f["a"] + f["b"] * math.log(x) for x in xs], style, color="#777", lw=1.5,
            label=f"fit over {name}: {f['a']:.3f} + {f['b']:.4f} ln(x), R² = {f['r2']:.2f}",
        )  # fmt: skip
    ax.plot([], [], "o", mfc="none", color="#555", label="hollow: majority vote at the same point")
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem, k x mean candidate length (log scale)")
    ax.set_ylabel(f"accuracy ({meta['problems']} problems, selector {meta['selector']})")
    ax.set_ylim(0, 0.8)
    ax.set_title(
        f"MetaStone-nano: accuracy over k (labels) x thinking budget, problems of seed {meta['seed']}"
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model file (default: the embedded model)")
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--seed", type=int, default=5151)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--record", type=Path, help="write a model copy with the table here")
    ap.add_argument("--auto", metavar="S[,S...]", help="compare auto's choices at these budgets")
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT.png from OUT.json")
    args = ap.parse_args(argv)
    if args.auto is not None:
        auto_compare(args)
        return
    if args.plot_only:
        d = json.loads(Path(f"{args.out}.json").read_text())
        plot(d["rows"], fits(d["rows"]), d["meta"], Path(f"{args.out}.png"))
        return
    budgets = [None if b == "None" else int(b) for b in args.budgets.split(",")]
    with Reasoner(args.model) as r:
        print(
            f"{r.model_path.name}: T={r.sampling.temperature} top-p {r.sampling.top_p}, threads "
            f"{r.n_threads}, max_new_tokens {args.max_new_tokens}, selector "
            f"{r.default_strategy.value}; {args.problems} problems (seed {args.seed}); budgets "
            f"{budgets}"
        )
        rows, meta = measure(r, args.seed, args.problems, budgets, args.max_new_tokens)
        src = r.model_path
    fit = fits(rows)
    print_grid(rows, fit)
    if args.record:
        table = table_of(rows, meta)
        write_model_copy(src, args.record, extra={keys.THINKING_SCALING: table.to_json()})
        Path(f"{args.record}.scaling.json").write_text(
            json.dumps({"meta": meta, "rows": rows, "fit": fit}, indent=1)
        )
        print(f"wrote {args.record} with {keys.THINKING_SCALING} ({len(table.points)} points)")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "fit": fit, "front": pareto(rows)}, indent=1)
    )
    plot(rows, fit, meta, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
