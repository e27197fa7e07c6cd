"""What the second turn of a chat saves through prefix reuse (`cache_prompt`), through the server.

    python bench/prefix_reuse.py [--model F.gguf] [--effort low]

Turn 1 asks a question; turn 2 sends the conversation with the answer and a follow-up. Turn 2 runs
twice, with `cache_prompt` false (every prompt token prefilled) and true (the server's default:
the cells turn 1 left are reused), in alternating order over the rounds. Printed per turn: prompt
tokens, tokens found in the cache, tokens prefilled, and the request's prefill seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from server_scaling import Server  # noqa: E402

FIRST = "A shop sells pens at 3 dollars each and notebooks at 5 dollars each. What do 4 pens cost?"
FOLLOW = "And what do 4 pens and 2 notebooks cost together?"


def ask(http: httpx.Client, messages: list[dict], body: dict) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": messages, **body})
    r.raise_for_status()
    return r.json()


def facts(out: dict) -> dict:
    t = out["metastone"]["timings"]
    return {
        "prompt": int(t["prompt_tokens"]),
        "cached": int(t["cached_prompt_tokens"]),
        "prefilled": int(t["prefill_tokens"]),
        "prefill_s": float(t["prefill_s"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--effort", default="low")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    args = ["--threads", str(a.threads), "--parallel", "1"]
    if a.model:
        args += ["--model", str(a.model.resolve())]
    srv = Server(REPO, args)
    body = {"effort": a.effort, "max_tokens": 64, "seed": 1}
    rows: dict[str, list[dict]] = {"turn 1": [], "turn 2, no cache": [], "turn 2, cache": []}
    try:
        with httpx.Client(base_url=srv.url, timeout=600) as http:
            for rnd in range(a.rounds):
                first = ask(http, [{"role": "user", "content": FIRST}], body)
                rows["turn 1"].append(facts(first))
                convo = [
                    {"role": "user", "content": FIRST},
                    {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                    {"role": "user", "content": FOLLOW},
                ]
                for cache in (False, True) if rnd % 2 == 0 else (True, False):
                    if cache:  # what turn 1 left: run it again so its prompt is the last one kept
                        ask(http, [{"role": "user", "content": FIRST}], body)
                    out = ask(http, convo, {**body, "cache_prompt": cache})
                    rows["turn 2, cache" if cache else "turn 2, no cache"].append(facts(out))
    finally:
        srv.stop()
    print(
        f"model {a.model.name if a.model else 'the embedded MetaStone-nano'}; effort {a.effort}; "
        f"threads {a.threads}; {a.rounds} rounds (medians)"
    )
    print("| request | prompt tokens | from the cache | prefilled | prefill s |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"| {name} | {med['prompt']:.0f} | {med['cached']:.0f} | {med['prefilled']:.0f} | "
            f"{med['prefill_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
