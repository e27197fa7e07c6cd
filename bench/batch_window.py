"""`batch --window W` against `--window 1` (one problem at a time, the runner before windows), side
by side on the same file, problems, seeds, threads and efforts: problems/s and their ratio.

    python bench/batch_window.py [--model F.gguf] [--n 200] [--efforts low,medium,adaptive]

The problems: MetaStone-nano's arithmetic task (bench/nano_problems.py's generator) for the
embedded model, else chat questions "What is A plus B? Answer briefly.". Each (effort, window)
run is a fresh `edge-metastone batch` process; the two windows alternate per round. The answers of
both runs are compared (batching can round a close choice differently: the count is printed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_problems(path: Path, n: int, nano: bool) -> None:
    rng = random.Random(2026)
    with path.open("w") as f:
        for i in range(n):
            a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
            prompt = f"What is ({a}+{b})*{c}?" if nano else f"What is {a} plus {b}? Answer briefly."
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt}) + "\n")


def run(src: Path, effort: str, window: int, args: argparse.Namespace) -> tuple[float, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "edge_metastone",
            "batch",
            str(src),
            "-o",
            str(out),
            "--effort",
            effort,
            "--window",
            str(window),
            "--threads",
            str(args.threads),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--no-progress",
        ]
        if args.model:
            cmd += ["--model", str(args.model)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        wall = time.perf_counter() - t0
        answers = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    return wall, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--efforts", default="low,medium,adaptive")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    name = a.model.name if a.model else "the embedded MetaStone-nano"
    print(
        f"model {name}; {a.n} problems; threads {a.threads}; max_new_tokens "
        f"{a.max_new_tokens}; seeds from the ids; a fresh `batch` process per run (its model "
        f"load included, the same on both sides)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "problems.jsonl"
        write_problems(src, a.n, a.model is None)
        print(
            f"| effort | --window 1 problems/s | --window {a.window} problems/s | ratio | same answers |"
        )
        print("|---|---|---|---|---|")
        for effort in a.efforts.split(","):
            walls: dict[int, list[float]] = {1: [], a.window: []}
            answers: dict[int, list[str]] = {}
            for rnd in range(a.rounds):
                order = (1, a.window) if rnd % 2 == 0 else (a.window, 1)
                for w in order:
                    wall, answers[w] = run(src, effort, w, a)
                    walls[w].append(wall)
            one, many = (a.n / statistics.median(walls[w]) for w in (1, a.window))
            same = sum(x == y for x, y in zip(answers[1], answers[a.window], strict=True))
            print(f"| {effort} | {one:.2f} | {many:.2f} | {many / one:.2f}x | {same}/{a.n} |")
            rows.append(
                {
                    "effort": effort,
                    "window_1_problems_per_s": one,
                    f"window_{a.window}_problems_per_s": many,
                    "ratio": many / one,
                    "same_answers": same,
                    "walls": walls,
                }
            )
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "model": name,
                    "n": a.n,
                    "threads": a.threads,
                    "max_new_tokens": a.max_new_tokens,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
