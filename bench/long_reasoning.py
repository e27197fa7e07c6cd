"""Long generations: the unified KV buffer against one KV stream per candidate, side by side.

    python bench/long_reasoning.py /tmp/syn200m-q4_0.gguf [--k 1,8] [--tokens 512,1536] [--rounds 1]

Every candidate runs the full length (end-of-turn banned; the step delimiter biased so steps are
scored), with the same prompt, sampling, threads and token counts for both layouts. Per run it
prints the decode step time over the first and the last 10% of steps, their ratio (how the step
cost grows with length), and the total. With k=1 the two layouts are the same work.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_metastone.engine.engine import Engine
from edge_metastone.limits import default_threads
from edge_metastone.types import GenerationSettings, SamplingSettings, TokenEvent

PROMPT = [
    {"role": "user", "content": "Find the sum of all positive divisors of 360. Think step by step."}
]


def run(engine: Engine, prompt: list[int], k: int, n: int, streams: bool, sampling) -> dict:
    """One generation; decode-step times from candidate 0's token stamps."""
    settings = GenerationSettings(max_new_tokens=n, kv_layout="streams" if streams else "unified")
    stamps = []
    t0 = time.perf_counter()
    for ev in engine.generate(prompt, k, sampling, settings):
        if isinstance(ev, TokenEvent) and ev.candidate == 0:
            stamps.append(time.perf_counter())
    total = time.perf_counter() - t0
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    tenth = max(1, len(steps) // 10)
    first, last = statistics.mean(steps[:tenth]), statistics.mean(steps[-tenth:])
    return {
        "first_ms": first * 1e3,
        "last_ms": last * 1e3,
        "growth": last / first,
        "total_s": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--k", default="1,8")
    ap.add_argument("--tokens", default="512,1536")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--step-bias", type=float, default=5.0)
    args = ap.parse_args()
    threads = args.threads or default_threads()
    engine = Engine(args.model, n_threads=threads)
    prompt = engine.encode_chat(PROMPT)[1]
    ban = tuple((t, -1e9) for t in engine.eog_ids)
    bias = ban + tuple((t, args.step_bias) for t in engine.rule.step_token_ids)
    sampling = SamplingSettings(temperature=1.0, top_p=0.95, top_k=40, seed=0, logit_bias=bias)
    print(
        f"model {args.model.name}, {threads} threads, prompt {len(prompt)} tokens, "
        f"T=1.0 top-p 0.95 top-k 40, end-of-turn banned, scoring on"
    )
    print(
        f"{'k':>3} {'tokens':>6} {'layout':>8} {'first ms':>9} {'last ms':>8} {'growth':>7} {'total s':>8}"
    )
    engine.generate_all(prompt, 2, sampling, GenerationSettings(max_new_tokens=8))  # warm up
    for k in (int(x) for x in args.k.split(",")):
        for n in (int(x) for x in args.tokens.split(",")):
            res = {}
            for streams in (False, True):
                r = run(engine, prompt, k, n, streams, dataclasses.replace(sampling))
                res[streams] = r
                name = "streams" if streams else "unified"
                print(
                    f"{k:>3} {n:>6} {name:>8} {r['first_ms']:9.1f} {r['last_ms']:8.1f} "
                    f"{r['growth']:6.2f}x {r['total_s']:8.1f}"
                )
            print(
                f"{'':>3} {'':>6} {'':>8} unified / streams total = "
                f"{res[False]['total_s'] / res[True]['total_s']:.2f}x"
            )
    engine.close()


if __name__ == "__main__":
    main()
