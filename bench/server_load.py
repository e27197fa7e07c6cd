"""Load on `edge-metastone serve`: requests/s and p50/p95 latency for 1, 4 and 16 concurrent clients,
against the same requests made through the Python API in a loop.

Both sides run the same model file, threads, effort, max_new_tokens, sampling and seeds. With one
client the difference is the server's own cost: HTTP, JSON, the queue and the hand-off between
threads. With c clients the server runs their requests together (`serve --parallel`, default 16:
their candidates decode as one batch), so its requests/s against the loop's is the batching gain
net of that cost; batched requests can round a close choice differently, so the script counts
the answers and token counts that differ from the loop's instead of requiring them equal.

    python bench/server_load.py                      # the embedded MetaStone-nano, effort medium
    python bench/server_load.py --model F.gguf --effort low --max-new-tokens 256 --requests 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
sys.path.insert(0, str(REPO))

from edge_metastone.limits import default_threads  # noqa: E402
from edge_metastone.models import default_model_path  # noqa: E402
from edge_metastone.options import DEFAULT_SAMPLING, ReasonOptions  # noqa: E402
from edge_metastone.reasoner import Reasoner  # noqa: E402


def problems(n: int) -> list[tuple[str, int]]:
    """n arithmetic prompts (the embedded model's task) with their seeds."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        a, b, c, d = (rng.randint(2, 99) for _ in range(4))
        out.append((f"What is ({a}+{b})*{c}-{d}?", i))
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def api_loop(r: Reasoner, reqs, effort: str) -> dict:
    """The requests one after another through `Reasoner.reason`."""
    lat, answers, tokens, inside = [], [], 0, 0.0
    t0 = time.perf_counter()
    for prompt, seed in reqs:
        t = time.perf_counter()
        res = r.reason(
            [{"role": "user", "content": prompt}], ReasonOptions(effort=effort, seed=seed)
        )
        lat.append(time.perf_counter() - t)
        answers.append(res.answer)
        tokens += sum(c.tokens for c in res.candidates)
        inside += res.timings["total_s"]
    return summary(time.perf_counter() - t0, lat, answers, tokens, inside)


def server_run(url: str, reqs, effort: str, model: str, concurrency: int) -> dict:
    """The requests from `concurrency` clients at once (each a keep-alive HTTP client)."""
    lat: list[float] = [0.0] * len(reqs)
    answers: list[str] = [""] * len(reqs)
    tokens = [0] * len(reqs)
    inside = [0.0] * len(reqs)  # the Reasoner's own time per request, as the server reports it
    next_i = iter(range(len(reqs)))
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                prompt, seed = reqs[i]
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "effort": effort,
                    "seed": seed,
                }
                t = time.perf_counter()
                resp = http.post("/v1/chat/completions", json=body)
                lat[i] = time.perf_counter() - t
                if resp.status_code != 200:
                    errors.append(resp.text)
                    return
                out = resp.json()
                # the chosen answer, as the loop's `res.answer` (the message's content is the
                # text after </think>, "The answer is \boxed{86}.", not the answer itself)
                answers[i] = out["metastone"]["answer"]
                tokens[i] = out["usage"]["completion_tokens"]
                inside[i] = out["metastone"]["timings"]["total_s"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"server error: {errors[0]}")
    return summary(wall, lat, answers, sum(tokens), sum(inside))


def _mean_share(xs: list[float | None]) -> float | None:
    """The runs' mean share, None when any run's requests overlapped."""
    return None if None in xs else statistics.mean(xs)


def _share(x: float | None) -> str:
    return "overlapping" if x is None else f"{x:.1%}"


def summary(wall: float, lat: list[float], answers: list[str], tokens: int, inside: float) -> dict:
    return {
        # wall time not spent inside Reasoner.reason; None when requests ran at once (the server
        # batches them: their reason() times overlap and add up to more than the wall time)
        "outside_frac": (wall - inside) / wall if inside <= wall else None,
        "wall_s": wall,
        "rps": len(lat) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": percentile(lat, 0.95),
        "answers": answers,
        "tokens": tokens,
    }


class Server:
    """`edge-metastone serve --port 0` in a subprocess."""

    def __init__(self, args: list[str]) -> None:
        self.out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_metastone", "serve", "--port", "0", *args],
            stdout=self.out,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        for _ in range(600):
            self.out.seek(0)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/", self.out.read())
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit("the server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            self.proc.wait(60)
        self.out.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: cores)")
    p.add_argument("--effort", default="medium", choices=["low", "medium", "high"])
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=4, help="paired runs per level")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    model = args.model or default_model_path()
    threads = args.threads or default_threads()
    levels = [int(c) for c in args.concurrency.split(",")]
    reqs = problems(args.requests)
    model_id = model.name.removesuffix(".gguf")

    print(
        f"model {model} ({model.stat().st_size / 2**20:.1f} MiB), {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        f"both sides: threads={threads}, effort={args.effort}, max_new_tokens={args.max_new_tokens}, "
        f"sampling T={DEFAULT_SAMPLING.temperature} top_p={DEFAULT_SAMPLING.top_p}, "
        f"{len(reqs)} requests, seeds 0..{len(reqs) - 1}, non-streaming"
    )
    print("API: Reasoner.reason in a loop, in this process")
    print(
        f"server: edge-metastone serve --threads {threads} --max-new-tokens {args.max_new_tokens} "
        "(a subprocess), clients: httpx keep-alive, one thread each\n"
    )

    server = Server(
        [
            "--model",
            str(model),
            "--threads",
            str(threads),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--max-queue",
            "64",
        ]
    )
    # Each level is measured as a pair (API loop, server) whose order alternates by round, and
    # the levels rotate: the machine is shared and drifts, and pairs cancel a linear drift.
    pairs: dict[int, list[tuple[dict, dict]]] = {c: [] for c in levels}
    try:
        with Reasoner(model, n_threads=threads, max_new_tokens=args.max_new_tokens) as r:
            api_loop(r, reqs[:4], args.effort)  # warm both sides
            server_run(server.url, reqs[:4], args.effort, model_id, 1)
            for rnd in range(args.rounds):
                for c in levels[rnd % len(levels) :] + levels[: rnd % len(levels)]:
                    if rnd % 2 == 0:
                        a = api_loop(r, reqs, args.effort)
                        b = server_run(server.url, reqs, args.effort, model_id, c)
                    else:
                        b = server_run(server.url, reqs, args.effort, model_id, c)
                        a = api_loop(r, reqs, args.effort)
                    pairs[c].append((a, b))
    finally:
        server.stop()

    first = pairs[levels[0]][0][0]
    for c, runs in pairs.items():
        for a, b in runs:
            assert a["answers"] == first["answers"], "the API loop is not reproducible"
            differ = sum(x != y for x, y in zip(b["answers"], first["answers"], strict=True))
            print(
                f"c={c}: {differ} of {len(reqs)} server answers differ from the loop's; "
                f"tokens {b['tokens']} vs {first['tokens']}"
            )
    print()
    print(
        "| clients | API loop req/s | server req/s | server/API | overhead "
        "| API p50 / p95 (s) | server p50 / p95 (s) | outside reason(): API / server |"
    )
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for c, runs in pairs.items():

        def mean(side: int, key: str, runs=runs) -> float:
            return statistics.mean(run[side][key] for run in runs)

        ratio = statistics.mean(b["rps"] / a["rps"] for a, b in runs)
        t = table[c] = {
            "api_rps": mean(0, "rps"),
            "server_rps": mean(1, "rps"),
            "ratio": ratio,
            "overhead": 1 / ratio - 1,
            "api_p50_s": mean(0, "p50_s"),
            "api_p95_s": mean(0, "p95_s"),
            "server_p50_s": mean(1, "p50_s"),
            "server_p95_s": mean(1, "p95_s"),
            "pair_ratios": [b["rps"] / a["rps"] for a, b in runs],
            "api_outside": _mean_share([run[0]["outside_frac"] for run in runs]),
            "server_outside": _mean_share([run[1]["outside_frac"] for run in runs]),
        }
        print(
            f"| {c} | {t['api_rps']:.2f} | {t['server_rps']:.2f} | {ratio:.3f} "
            f"| {t['overhead']:+.1%} | {t['api_p50_s']:.3f} / {t['api_p95_s']:.3f} "
            f"| {t['server_p50_s']:.3f} / {t['server_p95_s']:.3f} "
            f"| {_share(t['api_outside'])} / {_share(t['server_outside'])} |"
        )
    worst = max(t["overhead"] for t in table.values())
    verdict = "within" if worst <= 0.05 else "ABOVE"
    print(
        f"\nserver overhead (time per request vs the API loop, mean of {args.rounds} paired runs "
        f"per level), worst level: {worst:+.1%} ({verdict} the 5% bound)"
    )
    print(
        "per-pair server/API ratios: "
        + "; ".join(
            f"c={c}: " + ", ".join(f"{x:.3f}" for x in t["pair_ratios"]) for c, t in table.items()
        )
    )
    print(
        "latency: the API loop's is one call; the server's at c clients is its share of a batch "
        "of up to c requests\n"
        "outside reason(): the share of wall time not spent inside Reasoner.reason (the server's "
        "HTTP, JSON and hand-off when nothing overlaps them; the loop's own Python between calls; "
        "'overlapping' where the server ran requests at once)"
    )
    if args.json:
        settings = {
            "model": str(model),
            "threads": threads,
            "effort": args.effort,
            "max_new_tokens": args.max_new_tokens,
            "requests": len(reqs),
            "rounds": args.rounds,
        }
        args.json.write_text(json.dumps({"settings": settings, "results": table}, indent=1))


if __name__ == "__main__":
    main()
