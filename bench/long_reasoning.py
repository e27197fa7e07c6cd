"""Long generations: the unified KV buffer against one KV stream per candidate, side by side.

    python bench/long_reasoning.py /tmp/syn200m-q4_0.gguf                    # everything below
    python bench/long_reasoning.py MODEL --only full --full 1x1536,16x1536    # one section

Sections (`--only full,grid,gaps,scheduler`), all with the same prompt, sampling (T=1.0, top-p 0.95,
top-k 40, end-of-turn banned, the step delimiter biased so steps are scored) and threads for both
layouts:

- full: whole generations through the engine (`--full KxT,...`): the decode step time over the
  first and the last 10% of steps, their ratio (how the step cost grows with length), the total,
  and the sampled estimate of the same run (below) as a check of the sampling.
- grid: `--k` x `--tokens`, sampled. A whole k=32 x 4,096 run in the unified layout would take
  hours here, so each run is measured in windows: a context of the run's full size is filled to
  the window's position (one prefill, then llama.cpp's own sequence state copied into every
  candidate, so each holds its own cells as in a real run; the unified cache then holds the
  ~30-token prompt k times instead of once), and `--window` decode steps are timed as the engine
  runs them (decode with the feature capture, then every candidate sampled and its feature
  scored). Windows sit at 5%, 50% and 95% of the length; the total is the prefill plus the step
  times interpolated over every step. `--peak` adds each run's peak RSS, from a child process that
  runs the engine itself for a few steps (llama.cpp clears, so touches, the whole KV cache when it
  makes the context).
- gaps: k=16 with every other candidate pruned at its first token (the live sequence ids then have
  gaps): unified, streams with every gap split into its own graph, streams with gaps filled.
- scheduler: the scheduler's predicted latency and peak memory (this machine's calibration) against
  the sampled latency and a child process's peak RSS, for `--sched-k` at `--sched-tokens`, in
  each layout and with a q8_0 cache. Targets: latency within +-30%, memory within +-15%.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.engine import Engine
from edge_metastone.engine.llama import Batch, Context, ContextSettings
from edge_metastone.engine.sampling import Sampler
from edge_metastone.kvpolicy import kv_cells
from edge_metastone.limits import PREFILL_BATCH, default_threads
from edge_metastone.scheduler import MIB, Request, predict
from edge_metastone.types import (
    GenerationSettings,
    KVLayout,
    KVType,
    SamplingSettings,
    TokenEvent,
)

PROMPT = [
    {"role": "user", "content": "Find the sum of all positive divisors of 360. Think step by step."}
]
WINDOWS = (0.05, 0.5, 0.95)


def bench_sampling(engine: Engine, step_bias: float) -> SamplingSettings:
    """Every candidate runs to its length; steps are frequent enough to be scored."""
    ban = tuple((t, -1e9) for t in engine.eog_ids)
    bias = ban + tuple((t, step_bias) for t in engine.rule.step_token_ids)
    return SamplingSettings(temperature=1.0, top_p=0.95, top_k=40, seed=0, logit_bias=bias)


def full_run(engine: Engine, prompt: list[int], k: int, n: int, layout: KVLayout, sampling) -> dict:
    """One whole generation; decode-step times from candidate 0's token stamps."""
    settings = GenerationSettings(max_new_tokens=n, kv_layout=layout)
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


def window_ms(
    engine: Engine,
    prompt: list[int],
    k: int,
    n: int,
    at: int,
    layout: KVLayout,
    kv_type: KVType,
    sampling: SamplingSettings,
    steps: int,
) -> tuple[float, float]:
    """(median step ms at `at` generated tokens per candidate, prefill tokens/s of the fill), in a
    context sized as the engine sizes a k x n run."""
    model = engine.model
    n_batch = max(min(len(prompt), PREFILL_BATCH), k)
    cap = FeatureCapture(engine.feature_layer, model.n_embd, capacity=max(n_batch, PREFILL_BATCH))
    settings = ContextSettings(
        # unified: room for the prompt's k copies (see the module's doc) and the window's steps
        n_ctx=kv_cells(len(prompt), n, k, layout)
        + (k * (len(prompt) + steps) if layout is KVLayout.UNIFIED else 0),
        n_batch=max(n_batch, PREFILL_BATCH),
        n_seq_max=k,
        n_threads=engine.n_threads,
        kv_unified=layout is KVLayout.UNIFIED,
        kv_type=kv_type.value,
    )
    filler = (prompt * (at // len(prompt) + 2))[len(prompt) : len(prompt) + at]
    fill = prompt + filler
    head, rule = engine.model_file.head, engine.rule
    with (
        Context(model, settings, cb_eval=cap.callback, cb_user_data=cap.user_data) as ctx,
        Batch(settings.n_batch, 1) as batch,
    ):
        t0 = time.perf_counter()
        for _ in ctx.prefill(batch, fill):
            cap.take()
        fill_tps = len(fill) / (time.perf_counter() - t0)
        if k > 1:  # every candidate its own cells: llama.cpp's own copy of sequence 0's state
            size = llama_cpp.llama_state_seq_get_size(ctx.ptr, 0)
            buf = (ctypes.c_uint8 * size)()
            got = llama_cpp.llama_state_seq_get_data(ctx.ptr, buf, size, 0)
            for s in range(1, k):
                if llama_cpp.llama_state_seq_set_data(ctx.ptr, buf, got, s) != got:
                    raise RuntimeError(f"could not copy the state into sequence {s}")
            del buf
        samplers = [Sampler(sampling, s, model.n_vocab) for s in range(k)]
        toks = [fill[-1]] * k
        times = []
        try:
            for j in range(steps):
                t0 = time.perf_counter()
                batch.clear()
                rows = [batch.add(toks[s], len(fill) + j, (s,), True) for s in range(k)]
                ctx.decode(batch)
                feats = cap.take()
                new = [smp.sample(ctx.ptr, r) for smp, r in zip(samplers, rows, strict=True)]
                ends = [s for s in range(k) if rule.is_step_boundary(toks[s], new[s])]
                if head is not None:  # as the engine: the head scores step ends only
                    for s in ends:
                        head.scores(feats[rows[s]][None, :])
                toks = new
                times.append(time.perf_counter() - t0)
        finally:
            for smp in samplers:
                smp.close()
    return statistics.median(times) * 1e3, fill_tps


def sampled_run(engine, prompt, k, n, layout, kv_type, sampling, steps) -> dict[str, float]:
    """Step ms at the windows, growth between the first and last, and the estimated total."""
    at = [max(1, int(f * n)) for f in WINDOWS]
    ms, tps = zip(
        *(window_ms(engine, prompt, k, n, a, layout, kv_type, sampling, steps) for a in at),
        strict=True,
    )
    total = len(prompt) / tps[0] + float(np.interp(np.arange(n), at, ms).sum()) / 1e3
    return {
        "first_ms": ms[0],
        "mid_ms": ms[1],
        "last_ms": ms[-1],
        "growth": ms[-1] / ms[0],
        "total_s": total,
    }


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from edge_metastone.engine.engine import Engine
from edge_metastone.types import GenerationSettings, TokenEvent
from long_reasoning import PROMPT, bench_sampling
path, k, n, layout, kv_type, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], int(sys.argv[7])
with Engine(path, n_threads=threads) as e:
    prompt = e.encode_chat(PROMPT)[1]
    settings = GenerationSettings(max_new_tokens=n, kv_layout=layout, kv_type=kv_type)
    made = 0
    gen = e.generate(prompt, k, bench_sampling(e, float(sys.argv[8])), settings)
    for ev in gen:
        made += isinstance(ev, TokenEvent)
        if made >= 16 * k:
            break
    gen.close()
# VmHWM: this process image's own peak (ru_maxrss would carry the parent's over fork + exec)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024}))
"""


def peak_rss(
    model: Path, k: int, n: int, layout: KVLayout, kv_type: KVType, threads: int, step_bias: float
) -> int:
    """Peak RSS of a fresh process that runs the engine's k x n generation for 16 steps."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(Path(__file__).resolve().parent),
            str(model),
            str(k),
            str(n),
            layout.value,
            kv_type.value,
            str(threads),
            str(step_bias),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])


def pairs(spec: str) -> list[tuple[int, int]]:
    """'16x1536,1x1536' -> [(16, 1536), (1, 1536)]."""
    return [tuple(int(v) for v in item.split("x")) for item in spec.split(",") if item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--only", default="full,grid,gaps,scheduler")
    ap.add_argument("--full", default="1x1536,16x1536", help="KxT runs to generate in full")
    ap.add_argument("--k", default="1,8,32")
    ap.add_argument("--tokens", default="512,1536,4096")
    ap.add_argument("--window", type=int, default=8, help="decode steps timed per window")
    ap.add_argument("--peak", action="store_true", help="grid: peak RSS of each run (child)")
    ap.add_argument("--sched-k", default="8,32")
    ap.add_argument("--sched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weight-buffers", default=None, help="auto (default), extra, repack, plain")
    ap.add_argument(
        "--step-bias",
        type=float,
        default=0.0,
        help="logit bias on the step delimiter (5 makes most tokens a step end; real reasoning "
        "ends a step every 50-100 tokens, which the bench model's own rate, bias 0, is closer to)",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    threads = args.threads or default_threads()
    engine = Engine(args.model, n_threads=threads, weight_buffers=args.weight_buffers)
    prompt = engine.encode_chat(PROMPT)[1]
    sampling = bench_sampling(engine, args.step_bias)
    print(
        f"model {args.model.name}, {threads} threads, prompt {len(prompt)} tokens, "
        "T=1.0 top-p 0.95 top-k 40, end-of-turn banned, scoring on, F16 KV unless named"
    )
    print(f"weight buffers: {engine.model.weight_plan.summary()}")
    engine.generate_all(prompt, 2, sampling, GenerationSettings(max_new_tokens=8))  # warm up
    layouts = (KVLayout.UNIFIED, KVLayout.STREAMS)

    if "full" in only:
        print("\n== whole runs (sampled: the window estimate of the same run) ==")
        print(
            f"{'k':>3} {'tokens':>6} {'layout':>8} {'first ms':>9} {'last ms':>8} "
            f"{'growth':>7} {'total s':>8} {'sampled s':>10}"
        )
        growth = {}
        for k, n in pairs(args.full):
            res = {}
            for layout in layouts if k > 1 else (KVLayout.UNIFIED,):
                r = full_run(engine, prompt, k, n, layout, dataclasses.replace(sampling))
                est = sampled_run(engine, prompt, k, n, layout, KVType.F16, sampling, args.window)
                res[layout] = r
                growth[(k, n, layout)] = r["growth"]
                print(
                    f"{k:>3} {n:>6} {layout.value:>8} {r['first_ms']:9.1f} {r['last_ms']:8.1f} "
                    f"{r['growth']:6.2f}x {r['total_s']:8.1f} {est['total_s']:10.1f}"
                )
            if k > 1:
                ratio = res[KVLayout.STREAMS]["total_s"] / res[KVLayout.UNIFIED]["total_s"]
                print(f"{'':>19} streams / unified total = {ratio:.2f}x")
                base = growth.get((1, n, KVLayout.UNIFIED))
                if base:
                    print(
                        f"{'':>19} step growth vs k=1: unified "
                        f"{growth[(k, n, KVLayout.UNIFIED)] / base:.2f}x, streams "
                        f"{growth[(k, n, KVLayout.STREAMS)] / base:.2f}x"
                    )

    if "grid" in only:
        print(
            f"\n== sampled: windows of {args.window} steps at "
            f"{', '.join(f'{f:.0%}' for f in WINDOWS)} of the length =="
        )
        print(
            f"{'k':>3} {'tokens':>6} {'layout':>8} {'first ms':>9} {'mid ms':>8} {'last ms':>8} "
            f"{'growth':>7} {'total s':>8} {'KV MiB':>7}"
            + (f" {'peak MiB':>9}" if args.peak else "")
        )
        for k in (int(x) for x in args.k.split(",")):
            for n in (int(x) for x in args.tokens.split(",")):
                res = {}
                for layout in layouts if k > 1 else (KVLayout.UNIFIED,):
                    r = sampled_run(engine, prompt, k, n, layout, KVType.F16, sampling, args.window)
                    res[layout] = r
                    kv = engine.facts.kv_bytes(kv_cells(len(prompt), n, k, layout)) / MIB
                    peak = (
                        f" {peak_rss(args.model, k, n, layout, KVType.F16, threads, args.step_bias) / MIB:9.0f}"
                        if args.peak
                        else ""
                    )
                    print(
                        f"{k:>3} {n:>6} {layout.value:>8} {r['first_ms']:9.1f} {r['mid_ms']:8.1f} "
                        f"{r['last_ms']:8.1f} {r['growth']:6.2f}x {r['total_s']:8.1f} {kv:7.0f}"
                        + peak,
                        flush=True,
                    )
                if k > 1:
                    ratio = res[KVLayout.STREAMS]["total_s"] / res[KVLayout.UNIFIED]["total_s"]
                    print(f"{'':>19} streams / unified total = {ratio:.2f}x", flush=True)

    if "gaps" in only:
        from edge_metastone.engine import pool_rounds as llama_steps
        from edge_metastone.types import GenerationControl

        def pruned_run(layout: KVLayout, max_gap: int, n: int = 160) -> float:
            llama_steps.MAX_FILLED_GAP = max_gap
            control = GenerationControl()
            t0 = time.perf_counter()
            settings = GenerationSettings(max_new_tokens=n, kv_layout=layout)
            for ev in engine.generate(prompt, 16, sampling, settings, control=control):
                if isinstance(ev, TokenEvent) and ev.candidate % 2 and ev.candidate < 15:
                    control.prune(ev.candidate)
            return time.perf_counter() - t0

        print("\n== gaps: k=16 x 160 tokens, candidates 1,3,..,13 pruned at their first token ==")
        default_gap = llama_steps.MAX_FILLED_GAP
        for r in range(2):
            u = pruned_run(KVLayout.UNIFIED, default_gap)
            split = pruned_run(KVLayout.STREAMS, 0)
            filled = pruned_run(KVLayout.STREAMS, default_gap)
            print(
                f"round {r}: unified {u:.2f} s, streams split {split:.2f} s, "
                f"streams filled {filled:.2f} s",
                flush=True,
            )
        llama_steps.MAX_FILLED_GAP = default_gap

    if "scheduler" in only:
        from edge_metastone.reasoner import Reasoner

        engine.close()
        with Reasoner(args.model, n_threads=threads, sampling=sampling) as r:
            cal = r.calibration(refresh=True)  # measured with this sampling
            facts = r.facts
        engine = Engine(args.model, n_threads=threads)
        n = args.sched_tokens
        print(f"\n== scheduler: predicted vs measured, {n} tokens per candidate ==")
        print(
            f"calibration: attended cell {cal.attn_s_per_seq_cell}, masked cell "
            f"{cal.masked_s_per_seq_cell:.2e} s, q8_0 x{cal.quantized_attn_factor:.2f}"
        )
        print(
            f"{'k':>3} {'layout':>8} {'KV':>5} {'pred s':>8} {'meas s':>8} {'ratio':>6} "
            f"{'pred MiB':>9} {'peak MiB':>9} {'ratio':>6}"
        )
        ways = [
            (KVLayout.STREAMS, KVType.F16),
            (KVLayout.UNIFIED, KVType.F16),
            (KVLayout.STREAMS, KVType.Q8_0),
        ]
        for k in (int(x) for x in args.sched_k.split(",")):
            for layout, kv in ways:
                p = predict(facts, cal, Request(len(prompt), n), k, layout, kv)
                m = sampled_run(engine, prompt, k, n, layout, kv, sampling, args.window)
                rss = peak_rss(args.model, k, n, layout, kv, threads, args.step_bias)
                print(
                    f"{k:>3} {layout.value:>8} {kv.value:>5} {p.latency_s:8.1f} "
                    f"{m['total_s']:8.1f} {m['total_s'] / p.latency_s:6.2f} "
                    f"{p.memory_bytes / MIB:9.0f} {rss / MIB:9.0f} {rss / p.memory_bytes:6.2f}",
                    flush=True,
                )
    engine.close()
    print(
        f"\nthis process's peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
