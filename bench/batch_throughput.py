"""Batch throughput against `Reasoner.reason` in a loop, in one process, side by side.

    python bench/batch_throughput.py [--model FILE.gguf] [--problems 60] [--effort medium]
        [--threads 0] [--max-new-tokens 160] [--rounds 6]

Both sides run the same model, options, threads and problems (fresh MetaStone-nano problems with
gold answers), with the same per-record seeds, so they generate the same tokens; the tokens are
compared to prove it. The loop is the least a program can do: open the model, call `reason` per
problem. The batch (`run_batch`, what `edge-metastone batch` runs, without its progress bar) also
reads and validates the input, checks every answer against the gold one, and appends and fsyncs
one record per problem. Each side includes opening the model. Rounds alternate the order (loop,
batch, batch, loop, ...) so a noisy shared machine hits both. Ratios (batch/loop problems per
second): over all rounds, the median of the rounds' ratios, and by the process's CPU time (the
least sensitive to other jobs on the machine). Target: >= 0.95. Both also time what they do
outside `Reasoner.reason` (opening the model, reading, checking, writing): the batch's own
overhead, measured without most of the noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))
sys.path.insert(0, str(REPO))

from task import problems  # noqa: E402

from edge_metastone.batch.job import BatchJob  # noqa: E402
from edge_metastone.batch.jobfile import record_seed  # noqa: E402
from edge_metastone.batch.runner import run_batch  # noqa: E402
from edge_metastone.options import ReasonOptions  # noqa: E402
from edge_metastone.reasoner import Reasoner  # noqa: E402

IN_REASON = [0.0]  # seconds spent inside Reasoner.reason, both sides


def _timed_reason() -> None:
    """Count the time inside `Reasoner.reason`: what is left is each side's own overhead, a
    measure the machine's noise hits far less than wall time."""
    inner = Reasoner.reason

    def reason(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            IN_REASON[0] += time.perf_counter() - t0

    Reasoner.reason = reason


def write_input(path: Path, n: int, seed: int) -> list[dict]:
    """`n` problems as batch input lines; returns them."""
    lines = [
        {"id": f"p{i}", "prompt": p.prompt, "answer": p.answer}
        for i, p in enumerate(problems(seed, n))
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def run_loop(
    args: argparse.Namespace, lines: list[dict], options: ReasonOptions
) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, generated tokens) for `reason` in a loop."""
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    with Reasoner(args.model, n_threads=args.threads) as r:
        for x in lines:
            o = dataclasses.replace(options, seed=record_seed(options.seed, x["id"]))
            res = r.reason(x["prompt"], o)
            tokens += sum(c.tokens for c in res.candidates)
    return time.perf_counter() - t0, time.process_time() - c0, tokens


def run_job(
    args: argparse.Namespace, inp: Path, out: Path, options: ReasonOptions
) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, generated tokens) for the batch runner, from a fresh output."""
    for p in out.parent.glob(out.stem + "*"):
        p.unlink()
    job = BatchJob(
        input=inp, output=out, options=options, modes=(options.effort,), model=args.model,
        threads=args.threads,
    )  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    records, _ = run_batch(job, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert not any("error" in r for r in records), "a record failed"
    return wall, cpu, sum(r["tokens"] for r in records)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--effort", default="medium", choices=["low", "medium", "high"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=4242, help="problem set seed")
    args = ap.parse_args(argv)
    options = ReasonOptions(effort=args.effort, seed=0, max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "in.jsonl"
        lines = write_input(inp, args.problems, args.seed)
        run_loop(args, lines[:3], options)  # warm the page cache and imports for both sides
        _timed_reason()
        outside: dict[str, list[float]] = {"loop": [], "batch": []}
        wall: dict[str, list[float]] = {"loop": [], "batch": []}
        cpu: dict[str, list[float]] = {"loop": [], "batch": []}
        tokens: dict[str, set[int]] = {"loop": set(), "batch": set()}
        for rnd in range(args.rounds):
            order = ("loop", "batch") if rnd % 2 == 0 else ("batch", "loop")
            for side in order:
                IN_REASON[0] = 0.0
                if side == "loop":
                    w, c, t = run_loop(args, lines, options)
                else:
                    w, c, t = run_job(args, inp, Path(d) / "out.jsonl", options)
                wall[side].append(w)
                outside[side].append(w - IN_REASON[0])
                cpu[side].append(c)
                tokens[side].add(t)
                print(
                    f"round {rnd + 1} {side:<5} {w:7.2f} s  (CPU {c:6.2f} s, outside reason "
                    f"{w - IN_REASON[0]:5.3f} s)  {t} tokens",
                    flush=True,
                )
    assert tokens["loop"] == tokens["batch"] and len(tokens["loop"]) == 1, tokens
    n, tok = args.problems, tokens["loop"].pop()
    print(
        f"\n{n} problems, effort {args.effort}, max_new_tokens {args.max_new_tokens}, "
        f"threads {args.threads or 'auto'}, {tok} generated tokens per run, {args.rounds} rounds"
    )
    print(
        f"{'':<8}{'problems/s':>12}{'tokens/s':>10}{'median s':>10}{'CPU s':>10}"
        f"{'outside reason s':>18}"
    )
    rate = {}
    for side in ("loop", "batch"):
        total = sum(wall[side])
        rate[side] = n * len(wall[side]) / total
        print(
            f"{side:<8}{rate[side]:>12.2f}{tok * len(wall[side]) / total:>10.0f}"
            f"{statistics.median(wall[side]):>10.2f}{statistics.median(cpu[side]):>10.2f}"
            f"{statistics.median(outside[side]):>18.3f}"
        )
    paired = statistics.median(lw / bw for lw, bw in zip(wall["loop"], wall["batch"], strict=True))
    print(
        f"ratio batch/loop (problems/s): {rate['batch'] / rate['loop']:.3f} over all rounds, "
        f"{paired:.3f} median of the rounds' ratios, "
        f"{sum(cpu['loop']) / sum(cpu['batch']):.3f} by CPU time (target >= 0.95)"
    )
    own = statistics.median(outside["batch"]) - statistics.median(outside["loop"])
    med = statistics.median(wall["batch"])
    print(
        f"the batch's own work (time outside reason beyond the loop's): {own:.3f} s of {med:.2f} s "
        f"= {own / med:.1%}, a ratio of {1 - own / med:.3f} on a quiet machine"
    )


if __name__ == "__main__":
    main()
