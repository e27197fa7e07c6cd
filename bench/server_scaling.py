"""Server throughput against concurrent clients, this tree against a base checkout, side by side.

    git worktree add /tmp/base <base commit>      # the code to compare against
    python bench/server_scaling.py --base /tmp/base --model F.gguf --effort low

Each side is `edge-metastone serve` from its own source tree (PYTHONPATH), started alone on the
machine (never both at once: llama.cpp's threads busy-wait), on the same model file, threads,
effort, max_tokens, sampling (the server's default T and top_p) and seeds. For each number of
clients, every client sends its requests one after another (non-streaming chat), and the bench
prints completion tokens/s (every candidate's tokens, as `usage.completion_tokens` counts them),
requests/s and p50/p95 latency for both sides, and the ratio. The sides alternate by round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"What is ({rng.randint(2, 99)}+{rng.randint(2, 99)})*{rng.randint(2, 9)}?"
        for _ in range(n)
    ]


class Server:
    """`edge-metastone serve --port 0` from the source tree `tree`, in a subprocess."""

    def __init__(self, tree: Path, args: list[str]) -> None:
        self.out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_metastone", "serve", "--port", "0", *args],
            stdout=self.out,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=str(tree)),
            cwd=tree,
        )
        for _ in range(1200):
            self.out.seek(0)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/", self.out.read())
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"the server from {tree} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            self.proc.wait(120)
        self.out.close()


def load(url: str, model: str, texts: list[str], clients: int, body: dict) -> dict:
    """`clients` clients, each sending its share of `texts` one after another."""
    lat = [0.0] * len(texts)
    tokens = [0] * len(texts)
    it = iter(range(len(texts)))
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=1800) as http:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                req = {
                    "model": model,
                    "messages": [{"role": "user", "content": texts[i]}],
                    "seed": i,
                    **body,
                }
                t = time.perf_counter()
                r = http.post("/v1/chat/completions", json=req)
                lat[i] = time.perf_counter() - t
                if r.status_code != 200:
                    errors.append(r.text[:300])
                    return
                tokens[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"server error: {errors[0]}")
    lat.sort()
    return {
        "clients": clients,
        "requests": len(texts),
        "wall_s": wall,
        "tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall,
        "requests_per_s": len(texts) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="a checkout of the base commit")
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--effort", default="low", choices=["low", "medium", "high"])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    from edge_metastone.models import default_model_path

    model = (a.model or default_model_path()).resolve()
    levels = [int(c) for c in a.clients.split(",")]
    body = {"effort": a.effort, "max_tokens": a.max_tokens}
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True, capture_output=True
    ).stdout.strip()
    base = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=a.base, text=True, capture_output=True
    ).stdout.strip()
    print(
        f"model {model.name} ({model.stat().st_size / 2**20:.1f} MiB); both sides: serve "
        f"--threads {a.threads} --max-queue 256, effort {a.effort}, max_tokens {a.max_tokens}, "
        f"the server's default sampling, seeds = request index, {a.per_client} requests per "
        f"client, non-streaming chat; this tree {head} vs base {base} ({a.base})"
    )
    sides = {"this": REPO, "base": a.base}
    results: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in levels} for s in sides}
    for rnd in range(a.rounds):
        order = list(sides) if rnd % 2 == 0 else list(reversed(sides))
        for side in order:
            srv = Server(
                sides[side],
                ["--model", str(model), "--threads", str(a.threads), "--max-queue", "256"],
            )
            try:
                mid = model.name.removesuffix(".gguf")
                load(srv.url, mid, prompts(2, 99), 1, body)  # warm up
                for c in levels:
                    texts = prompts(c * a.per_client, c)
                    results[side][c].append(load(srv.url, mid, texts, c, body))
            finally:
                srv.stop()
    rows = []
    print("\n| clients | side | tokens/s | requests/s | p50 s | p95 s | vs base | vs 1 client |")
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        med = {
            s: {
                k: statistics.median(r[k] for r in results[s][c])
                for k in ("tokens_per_s", "requests_per_s", "p50_s", "p95_s")
            }
            for s in sides
        }
        for s in sides:
            one = statistics.median(r["tokens_per_s"] for r in results[s][levels[0]])
            m = med[s]
            vs = m["tokens_per_s"] / med["base"]["tokens_per_s"]
            print(
                f"| {c} | {s} | {m['tokens_per_s']:.1f} | {m['requests_per_s']:.2f} | "
                f"{m['p50_s']:.2f} | {m['p95_s']:.2f} | {vs:.2f}x | "
                f"{m['tokens_per_s'] / one:.2f}x |"
            )
            rows.append({"clients": c, "side": s, **m})
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "model": model.name,
                    "effort": a.effort,
                    "max_tokens": a.max_tokens,
                    "threads": a.threads,
                    "this": head,
                    "base": base,
                    "rows": rows,
                    "runs": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
