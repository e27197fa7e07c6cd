"""The budget scheduler's predictions against measurements, mode by mode.

    python bench/scheduler.py /tmp/syn200m-q4_0.gguf [--max-new-tokens 128]

Calibrates (or loads the cached calibration), then runs each effort mode in a fresh child process
(so its peak RSS is that run's alone) with end-of-turn tokens banned, so every candidate runs to
max_new_tokens as the prediction assumes. Prints predicted vs measured latency (target within
+-30%) and peak memory (target within +-15%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHILD = r"""
import json, sys
from edge_metastone.engine.sampling import SamplingSettings
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import Calibration
model, effort, max_new, cal = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
with Reasoner(model, calibration=Calibration.from_json(cal), max_new_tokens=max_new) as r:
    m = r.backend.model
    ban = tuple((t, -1e9) for t in m.eog_ids)
    r.sampling = SamplingSettings(temperature=0.6, top_p=0.95, top_k=40, logit_bias=ban)
    res = r.reason(PROMPT, effort=effort, seed=0)
# VmHWM: this process image's own peak (ru_maxrss would carry the parent's over fork + exec)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"latency_s": res.timings["total_s"] - res.timings["plan_s"], "peak_rss": peak,
                  "predicted": res.predicted, "tokens": sum(c.tokens for c in res.candidates)}))
"""
PROMPT = "Find the sum of all positive divisors of 360. Think step by step."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--refresh", action="store_true", help="re-measure the calibration")
    args = ap.parse_args()

    from edge_metastone.reasoner import Reasoner
    from edge_metastone.scheduler import MIB
    from edge_metastone.types import SamplingSettings

    # top_k 40: a random model is near-uniform, so top-p alone would sort the whole vocabulary
    # every token (real models are peaked and llama.cpp then sorts only the top 256)
    sampling = SamplingSettings(temperature=0.6, top_p=0.95, top_k=40)
    with Reasoner(args.model, n_threads=args.threads, sampling=sampling) as r:
        cal = r.calibration(refresh=args.refresh)
    steps = ", ".join(f"{b}:{s * 1000:.1f}ms" for b, s in sorted(cal.step_seconds.items()))
    print(
        f"calibration: step {steps}; prefill {cal.prefill_tokens_per_s:.0f} tok/s; "
        f"base RSS {cal.base_rss_bytes / MIB:.0f} MiB"
    )
    print(
        f"{'mode':7s} {'k':>3s} {'pred s':>8s} {'meas s':>8s} {'ratio':>6s}   "
        f"{'pred MiB':>9s} {'meas MiB':>9s} {'ratio':>6s}"
    )
    code = CHILD.replace("PROMPT", repr(PROMPT))
    for effort, k in (("low", 2), ("medium", 8), ("high", 32)):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(args.model),
                effort,
                str(args.max_new_tokens),
                json.dumps(cal.to_json()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
        pl, pm = m["predicted"]["latency_s"], m["predicted"]["memory_mb"]
        ml, mm = m["latency_s"], m["peak_rss"] / MIB
        print(
            f"{effort:7s} {k:3d} {pl:8.2f} {ml:8.2f} {ml / pl:6.2f}   {pm:9.0f} {mm:9.0f} {mm / pm:6.2f}"
        )


if __name__ == "__main__":
    main()
