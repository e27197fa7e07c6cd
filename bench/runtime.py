"""Runtime benchmarks, each a ratio of two runs measured side by side in this process.

    python bench/make_synthetic_checkpoint.py /tmp/syn200m --preset 200m
    edge-metastone convert /tmp/syn200m -o /tmp/syn200m-q4_0.gguf --outtype q4_0
    python bench/runtime.py /tmp/syn200m-q4_0.gguf [--tokens 256] [--rounds 3]

(a) k=8 with in-stream scoring / the same generation with scoring off         target <= 1.03
(b) fused best-of-8 / generate, then re-run every candidate to score it        target <= 0.80
    b1: re-run through the same llama.cpp model (a lean baseline we built, not the reference's)
    b2: re-run through Hugging Face transformers float32, as the reference pipeline does
        (needs --hf-dir; model load time excluded)
(c) batched k=8 throughput / 8 sequential single-candidate generations         target >= 1.5
(d) k=1 tokens/s / llama-cpp-python's own Llama.generate (same file, threads)  target >= 1.0
    d0: the same with scoring off; d1: scoring on                                        (>= 0.97)
    --processes N runs (d) in N fresh processes and reports the median of their ratios
(e) the chosen weight-buffer mode / extra buffer types off (plain), k=1 and k=8 tokens/s

Every side loads the model with the same weight-buffer mode (`--weight-buffers`, default auto, as
the package chooses on this machine); stock llama-cpp-python gets it through
`stock_defaults` (tests/stock_llama.py). (e) loads a second engine in plain mode.

The model is random, so end-of-turn tokens are banned (every candidate runs the full length), the
step delimiter is biased up so steps happen, and top-k 40 keeps sampling as cheap as on a peaked
real model.
Rounds alternate the two sides of each ratio; the median of the per-round ratios is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # stock_llama

from edge_metastone.engine.engine import Engine
from edge_metastone.engine.scoring import score_tokens
from edge_metastone.limits import default_threads
from edge_metastone.types import GenerationSettings, SamplingSettings

PROMPT = [
    {"role": "user", "content": "Find the sum of all positive divisors of 360. Think step by step."}
]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(
    a: Callable[[], object], b: Callable[[], object], rounds: int
) -> tuple[float, float, float]:
    """Median seconds of a and b, and the median of per-round ratios a/b (alternating order)."""
    ta, tb, ratios = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            x, y = timed(a), timed(b)
        else:
            y, x = timed(b), timed(a)
        ta.append(x)
        tb.append(y)
        ratios.append(x / y)
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="a,b1,c,d", help="which comparisons (a, b1, c, d, e)")
    ap.add_argument(
        "--weight-buffers",
        default=None,
        help="auto (default), extra, repack or plain: the mode of every side",
    )
    ap.add_argument(
        "--hf-dir", type=Path, default=None, help="HF checkpoint of the same model (b2)"
    )
    ap.add_argument(
        "--step-bias",
        type=float,
        default=5.0,
        help="logit bias of the step delimiter (5.0: ~1 step per 25 tokens on the 200m preset)",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="(d) only: run it in N fresh processes, one after another, and report the median "
        "of their ratios (the stock side's decode speed varies from process to process)",
    )
    args = ap.parse_args()
    if args.processes > 1:
        _d_over_processes(args)
        return
    threads = args.threads or default_threads()
    engine = Engine(args.model, n_threads=threads, weight_buffers=args.weight_buffers)
    mf = engine.model_file
    plan = engine.model.weight_plan
    eog = engine.model.eog_ids
    bias = tuple((t, -1e9) for t in eog) + tuple((t, args.step_bias) for t in mf.step_token_ids)
    # top_k 40 keeps sampling as cheap as on a real (peaked) model: a random model's near-uniform
    # distribution would make top-p sort the whole vocabulary every token
    sampling = SamplingSettings(temperature=1.0, top_p=0.95, top_k=40, seed=0, logit_bias=bias)
    on = GenerationSettings(max_new_tokens=args.tokens, score_steps=True)
    off = GenerationSettings(max_new_tokens=args.tokens, score_steps=False)
    prompt = engine.tokenize(engine.render(PROMPT))
    k, n = args.k, args.tokens
    print(
        f"model {args.model.name}: {mf.n_params / 1e6:.0f}M params, {mf.n_bytes / 2**20:.0f} MiB, "
        f"threads {threads}, prompt {len(prompt)} tokens, k={k} x {n} tokens, rounds {args.rounds}"
    )
    print(f"weight buffers: {plan.summary()}; {plan.repacked} weights in CPU_REPACK")

    engine.generate_all(prompt, 2, sampling, GenerationSettings(max_new_tokens=16))  # warm up
    steps = sum(len(c.step_scores) for c in engine.generate_all(prompt, k, sampling, on))
    print(f"scored steps per k={k} run: {steps} (one per {k * n / max(steps, 1):.0f} tokens)")

    def fused() -> list:
        return engine.generate_all(prompt, k, sampling, on)

    def unscored() -> list:
        return engine.generate_all(prompt, k, sampling, off)

    parts = set(args.only.split(","))
    if "a" in parts:
        ta, tb, r = side_by_side(fused, unscored, args.rounds)
        print(
            f"(a) scoring on / off           {ta:7.2f} s / {tb:7.2f} s = {r:.3f}   (target <= 1.03)"
        )

    def rescore() -> None:
        for c in engine.generate_all(prompt, k, sampling, off):
            score_tokens(mf, engine.model, prompt + c.token_ids, parity=False)

    if "b1" in parts:
        ta, tb, r = side_by_side(fused, rescore, args.rounds)
        print(
            f"(b1) fused / gen+llama rescore {ta:7.2f} s / {tb:7.2f} s = {r:.3f}   (target <= 0.80)"
        )
    if args.hf_dir is not None:
        hf_rescore = _hf_rescorer(args.hf_dir, mf.n_layers)

        def reference_pipeline() -> None:
            for c in engine.generate_all(prompt, k, sampling, off):
                hf_rescore(prompt + c.token_ids)

        ta, tb, r = side_by_side(fused, reference_pipeline, args.rounds)
        print(
            f"(b2) fused / gen+HF rescore    {ta:7.2f} s / {tb:7.2f} s = {r:.3f}   (target <= 0.80)"
        )

    def sequential() -> None:
        for i in range(k):
            engine.generate_all(prompt, 1, sampling, on, candidate_offset=i)

    if "c" in parts:
        ta, tb, r = side_by_side(sequential, fused, args.rounds)
        print(
            f"(c) batched throughput gain    {ta:7.2f} s / {tb:7.2f} s = {r:.2f}x  (target >= 1.5)"
        )
    if "e" in parts:
        _compare_modes(args.model, engine, prompt, sampling, on, threads, k, n, args.rounds)
    if "d" not in parts:
        engine.close()
        return

    import llama_cpp
    from stock_llama import stock_defaults

    with stock_defaults(args.model, plan.mode):  # the engine's weight-buffer mode, no canary
        llm = llama_cpp.Llama(
            str(args.model),
            n_ctx=len(prompt) + n + 16,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            logits_all=False,
        )

    # Llama.generate does not stop at end-of-turn tokens by itself, so it also runs n tokens.
    def theirs() -> None:
        llm.reset()
        gen = llm.generate(
            prompt,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=1.0,
        )
        for i, _tok in enumerate(gen):
            if i + 1 >= n:
                break

    # the same file, weight buffers, threads, prompt, token count and sampler settings
    print(
        f"(d) both sides: {args.model.name}, weights {plan.mode.value}, {threads} threads, "
        f"prompt {len(prompt)} tokens, {n} tokens, T={sampling.temperature} top-p "
        f"{sampling.top_p} top-k {sampling.top_k} min-p {sampling.min_p}, no repeat penalty"
    )
    for label, settings, target in (("d0", off, "1.0"), ("d1", on, "0.97")):

        def ours(settings: GenerationSettings = settings) -> None:
            engine.generate_all(prompt, 1, sampling, settings)

        ta, tb, r = side_by_side(ours, theirs, args.rounds)
        what = "scoring on " if settings.score_steps else "scoring off"
        print(
            f"({label}) k=1 {what} ours / Llama {n / ta:7.1f} t/s / {n / tb:7.1f} t/s = "
            f"{1 / r:.3f}   (target >= {target})"
        )
    llm.close()
    engine.close()


def _d_over_processes(args: argparse.Namespace) -> None:
    """(d) in `args.processes` child processes, run one at a time (never side by side: llama.cpp's
    threads busy-wait); each child's ratios, then their medians."""
    import re
    import subprocess

    cmd = [sys.executable, __file__, str(args.model), "--only", "d", "--rounds", str(args.rounds)]
    cmd += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
    if args.weight_buffers:
        cmd += ["--weight-buffers", args.weight_buffers]
    ratios: dict[str, list[float]] = {"d0": [], "d1": []}
    for i in range(args.processes):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if i == 0 and line.startswith(("model", "weight buffers", "(d) both")):
                print(line)
            m = re.match(r"\((d[01])\).* = ([0-9.]+)", line)
            if m:
                ratios[m.group(1)].append(float(m.group(2)))
                print(f"process {i + 1}: {line}")
    for label, target in (("d0", "1.0"), ("d1", "0.97")):
        vals = ratios[label]
        print(
            f"({label}) median over {len(vals)} processes {statistics.median(vals):.3f} "
            f"(min {min(vals):.3f}, max {max(vals):.3f})   (target >= {target})"
        )


def _compare_modes(
    path: Path,
    engine: Engine,
    prompt: list[int],
    sampling: SamplingSettings,
    settings: GenerationSettings,
    threads: int,
    k: int,
    n: int,
    rounds: int,
) -> None:
    """(e): the engine's weight-buffer mode against extra buffer types off, k=1 and k=k."""
    plain = Engine(path, n_threads=threads, weight_buffers="plain")
    mode = engine.model.weight_plan.mode.value
    print(
        f"(e) both sides: {path.name}, {threads} threads, prompt {len(prompt)} tokens, {n} tokens "
        f"per candidate, scoring {'on' if settings.score_steps else 'off'}, the same sampling; "
        f"weights {mode} / plain"
    )
    for kk in (1, k):

        def chosen(kk: int = kk) -> None:
            engine.generate_all(prompt, kk, sampling, settings)

        def off(kk: int = kk) -> None:
            plain.generate_all(prompt, kk, sampling, settings)

        ta, tb, r = side_by_side(chosen, off, rounds)
        print(
            f"(e) k={kk:<2} {mode} / plain     {kk * n / ta:7.1f} t/s / {kk * n / tb:7.1f} t/s = "
            f"{1 / r:.3f}x"
        )
    plain.close()


def _hf_rescorer(hf_dir: Path, n_layers: int) -> Callable[[list[int]], float]:
    """The reference pipeline's scorer: HF float32 forward, hidden_states[-2], head on every token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    state = torch.load(hf_dir / "score_module.pt", weights_only=True)
    c = state["0.weight"].shape[1]
    head = torch.nn.Sequential(
        torch.nn.Linear(c, 2 * c), torch.nn.ReLU(), torch.nn.Linear(2 * c, 1)
    )
    head.load_state_dict(
        {
            "0.weight": state["0.weight"],
            "0.bias": state["0.bias"],
            "2.weight": state["3.weight"],
            "2.bias": state["3.bias"],
        }
    )
    head = head.float().eval()

    @torch.no_grad()
    def rescore(ids: list[int]) -> float:
        out = model(torch.tensor([ids]), output_hidden_states=True)
        return float(torch.sigmoid(head(out.hidden_states[-2][0])).mean())

    return rescore


if __name__ == "__main__":
    main()
