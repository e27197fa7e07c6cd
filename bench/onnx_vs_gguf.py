"""ONNX int4 (onnxruntime) against GGUF Q4_0 (llama.cpp) on the same model: decode tokens/s at k=1
and k=8 with in-stream scoring on and off, prefill time, and peak memory.

    python bench/make_synthetic_checkpoint.py /tmp/syn200m --preset 200m
    edge-metastone convert /tmp/syn200m -o /tmp/syn200m-q4_0.gguf --outtype q4_0
    edge-metastone convert /tmp/syn200m --format onnx -o /tmp/syn200m-onnx-int4
    python bench/onnx_vs_gguf.py /tmp/syn200m-q4_0.gguf /tmp/syn200m-onnx-int4 [--tokens 128]

Each side runs in its own child process (so each peak RSS is that runtime's alone: Python, the
runtime, the model and its caches), with the same prompt, thread count, sampling settings and token
counts (end-of-turn tokens are banned, so every candidate generates exactly --tokens; the step
delimiter is biased up so steps happen). Rounds alternate the sides; medians are reported.
decode tok/s = generated tokens / (generation time - prefill time), sampling and scoring included.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [
    {"role": "user", "content": "Find the sum of all positive divisors of 360. Think step by step."}
]
CONFIGS = [(1, True), (1, False), (8, True), (8, False)]


def worker(model: str, threads: int, tokens: int, repeats: int, step_bias: float) -> dict:
    """Load one backend and time every config; the JSON result goes to stdout."""
    from edge_metastone.calibration import current_rss_bytes
    from edge_metastone.runtime import open_backend
    from edge_metastone.types import GenerationControl, GenerationSettings, SamplingSettings

    t0 = time.perf_counter()
    backend = open_backend(model, n_threads=threads)
    load_s = time.perf_counter() - t0
    _prompt_text, prompt = backend.encode_chat(PROMPT)
    bias = tuple((t, -1e9) for t in backend.eog_ids)
    bias += tuple((t, step_bias) for t in backend.rule.step_token_ids)
    sampling = SamplingSettings(temperature=1.0, top_k=40, top_p=0.95, seed=0, logit_bias=bias)
    rss_loaded = current_rss_bytes()
    out: dict = {"runtime": backend.runtime, "load_s": load_s, "prompt_tokens": len(prompt)}
    out["rss_loaded_mib"] = rss_loaded / 2**20
    for k, scoring in CONFIGS:
        runs = []
        for _ in range(repeats):
            control = GenerationControl()
            gen = GenerationSettings(max_new_tokens=tokens, score_steps=scoring)
            steps = 0
            for ev in backend.generate(prompt, k, sampling, gen, control=control):
                steps += type(ev).__name__ == "StepEvent"
            tm = control.timings
            runs.append(
                {
                    "tokens": tm.generated_tokens,
                    "decode_tps": tm.generated_tokens / (tm.total_s - tm.prefill_s),
                    "prefill_ms": 1000 * tm.prefill_s,
                    "steps": steps,
                }
            )
        best = max(runs, key=lambda r: r["decode_tps"])
        out[f"k{k}-{'score' if scoring else 'noscore'}"] = best
    backend.close()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_side(model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(model), "--threads", str(args.threads)]
    cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    cmd += ["--step-bias", str(args.step_bias)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{model}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path, nargs="?")
    ap.add_argument("onnx_dir", type=Path, nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="runs per config in a child (best kept)")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per side, alternating")
    ap.add_argument(
        "--step-bias",
        type=float,
        default=5.0,
        help="logit bias of the step delimiter (as bench/runtime.py: steps happen on a random model)",
    )
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(
            json.dumps(worker(args.worker, args.threads, args.tokens, args.repeats, args.step_bias))
        )
        return
    if args.gguf is None or args.onnx_dir is None:
        ap.error("give the GGUF file and the ONNX directory")
    sides = {"GGUF Q4_0": args.gguf, "ONNX int4": args.onnx_dir}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            results[name].append(run_side(sides[name], args))

    def med(name: str, key: str, field: str | None = None) -> float:
        vals = [res[key][field] if field else res[key] for res in results[name]]
        return statistics.median(vals)

    first = {name: res[0] for name, res in results.items()}
    print(f"threads {args.threads}, prompt {first['GGUF Q4_0']['prompt_tokens']} tokens "
          f"(ONNX {first['ONNX int4']['prompt_tokens']}), {args.tokens} new tokens per candidate, "
          f"T=1.0 top-k 40 top-p 0.95, EOG banned, step bias +{args.step_bias}; medians of {args.rounds} child runs per side")  # fmt: skip
    for name in sides:
        print(f"  {name}: {first[name]['runtime']}; model {sides[name]}")
    print()
    print("| config | GGUF Q4_0 decode tok/s | ONNX int4 decode tok/s | ONNX / GGUF | tokens (each side) | steps scored (GGUF / ONNX) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for k, scoring in CONFIGS:
        key = f"k{k}-{'score' if scoring else 'noscore'}"
        g, o = med("GGUF Q4_0", key, "decode_tps"), med("ONNX int4", key, "decode_tps")
        tok = (first["GGUF Q4_0"][key]["tokens"], first["ONNX int4"][key]["tokens"])
        steps = (first["GGUF Q4_0"][key]["steps"], first["ONNX int4"][key]["steps"])
        label = f"k={k}, scoring {'on' if scoring else 'off'}"
        print(f"| {label} | {g:.1f} | {o:.1f} | {o / g:.2f} | {tok[0]} / {tok[1]} | {steps[0]} / {steps[1]} |")  # fmt: skip
    print()
    print("| | GGUF Q4_0 | ONNX int4 |")
    print("|---|---|---|")
    for label, key, field in [
        ("prefill, ms (k=8 run)", "k8-score", "prefill_ms"),
    ]:
        print(f"| {label} | {med('GGUF Q4_0', key, field):.0f} | {med('ONNX int4', key, field):.0f} |")  # fmt: skip
    print(f"| load, s | {med('GGUF Q4_0', 'load_s'):.2f} | {med('ONNX int4', 'load_s'):.2f} |")
    print(f"| RSS after load, MiB | {med('GGUF Q4_0', 'rss_loaded_mib'):.0f} | {med('ONNX int4', 'rss_loaded_mib'):.0f} |")  # fmt: skip
    print(f"| peak RSS (whole run), MiB | {med('GGUF Q4_0', 'peak_rss_mib'):.0f} | {med('ONNX int4', 'peak_rss_mib'):.0f} |")  # fmt: skip
    sizes = {
        name: (p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir()))
        for name, p in sides.items()
    }
    print(f"| model on disk, MiB | {sizes['GGUF Q4_0'] / 2**20:.0f} | {sizes['ONNX int4'] / 2**20:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
