"""One request alone, this tree against a base checkout: k=1 and k=8 decode tokens/s and wall time
per generation through the backend's `generate` (the path every front takes), side by side.

    python bench/single_request.py --base /tmp/base [--model F.gguf]

Each side runs in its own process (PYTHONPATH = its tree), alone on the machine, on the same file,
threads, prompt, sampling (T 0.7, top_p 0.95, seeds 0..n-1) and max_new_tokens; the sides
alternate by round and the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from edge_metastone.runtime import open_backend
from edge_metastone.models import default_model_path
from edge_metastone.types import GenerationSettings, SamplingSettings
model, threads, k, n, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
b = open_backend(model or default_model_path(), n_threads=threads)
_, ids = b.encode_chat([{"role": "user", "content": "What is 48 plus 27? Answer briefly."}])
settings = GenerationSettings(max_new_tokens=new)
b.generate_all(ids, k, SamplingSettings(temperature=0.7, top_p=0.95, seed=99), settings)
walls, tokens = [], 0
for i in range(n):
    t = time.perf_counter()
    cands = b.generate_all(ids, k, SamplingSettings(temperature=0.7, top_p=0.95, seed=i), settings)
    walls.append(time.perf_counter() - t)
    tokens += sum(c.n_tokens for c in cands)
print(json.dumps({"wall_s": sum(walls), "tokens": tokens}))
"""


def side(tree: Path, a: argparse.Namespace, k: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    args = [str(a.model or ""), str(a.threads), str(k), str(a.n), str(a.max_new_tokens)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=6, help="generations per side and round")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    name = a.model.name if a.model else "the embedded MetaStone-nano"
    print(
        f"model {name}; threads {a.threads}; {a.n} generations per side and round, "
        f"max_new_tokens {a.max_new_tokens}, T 0.7 top_p 0.95; {a.rounds} alternating rounds"
    )
    rows = []
    for k in (1, 8):
        res: dict[str, list[dict]] = {"this": [], "base": []}
        for rnd in range(a.rounds):
            for s in ("this", "base") if rnd % 2 == 0 else ("base", "this"):
                res[s].append(side(REPO if s == "this" else a.base, a, k))
        rate = {s: statistics.median(r["tokens"] / r["wall_s"] for r in res[s]) for s in res}
        toks = {s: res[s][0]["tokens"] for s in res}
        print(
            f"k={k}: this {rate['this']:.1f} tokens/s, base {rate['base']:.1f} tokens/s, "
            f"ratio {rate['this'] / rate['base']:.3f} (tokens per round: this {toks['this']}, "
            f"base {toks['base']})"
        )
        rows.append(
            {
                "k": k,
                "this_tokens_per_s": rate["this"],
                "base_tokens_per_s": rate["base"],
                "ratio": rate["this"] / rate["base"],
                "runs": res,
            }
        )
    if a.json:
        a.json.write_text(json.dumps({"model": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
