"""Does the ONNX int4 model choose the candidates the GGUF Q4_0 engine chooses?

    python bench/onnx_agreement.py HF_DIR [--prompts 60] [--k 8] [--tokens 96] [--work DIR]

HF_DIR is converted four ways (GGUF q4_0 and f32, ONNX int4 and f32; kept in --work). Per prompt
(seed = prompt index), what is measured:

1. selection on shared candidates: the GGUF Q4_0 engine samples k candidates; each candidate is
   scored by the Q4_0 engine (online, as `reason` does), by ONNX int4 and by ONNX f32 (the float
   reference, itself within 1e-4 of HF transformers); best-of-k picks per scorer are compared.
   This isolates the question that runtimes can be asked to agree on: given the same candidates,
   does the int4 SPRM rank them as Q4_0 does?
2. independent runs at the same seed: ONNX int4 samples its own k candidates. Token-for-token
   equality is not expected (different sampler RNG, different 4-bit rounding): reported as measured.
3. greedy decoding (k=1, T=0, no bias): identical continuations and the mean common prefix, int4
   vs Q4_0 and f32 vs f32.

When sampling, the step delimiter is biased up (--step-bias) so a random model takes steps at all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_metastone.backend import generate_all
from edge_metastone.runtime import open_backend
from edge_metastone.types import GenerationSettings, SamplingSettings


def best(scores: list[float]) -> int:
    """Best-of-k: highest score, ties to the lowest index."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def convert_all(hf_dir: Path, work: Path) -> dict[str, Path]:
    from edge_metastone.converters.convert import convert
    from edge_metastone.converters.onnx_export import export_onnx

    paths = {
        "q4_0": work / "m-q4_0.gguf",
        "gguf_f32": work / "m-f32.gguf",
        "int4": work / "m-onnx-int4",
        "onnx_f32": work / "m-onnx-f32",
    }
    if not paths["q4_0"].exists():
        convert(hf_dir, paths["q4_0"], "q4_0")
    if not paths["gguf_f32"].exists():
        convert(hf_dir, paths["gguf_f32"], "f32")
    if not paths["int4"].exists():
        export_onnx(hf_dir, paths["int4"], "int4")
    if not paths["onnx_f32"].exists():
        export_onnx(hf_dir, paths["onnx_f32"], "f32")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--step-bias", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = convert_all(args.hf_dir, work)
    q4 = open_backend(paths["q4_0"])
    g32 = open_backend(paths["gguf_f32"], parity=True)
    i4 = open_backend(paths["int4"])
    o32 = open_backend(paths["onnx_f32"])
    bias = tuple((t, args.step_bias) for t in q4.rule.step_token_ids)
    gen = GenerationSettings(max_new_tokens=args.tokens)
    agree = {"int4 vs q4_0": 0, "int4 vs f32": 0, "q4_0 vs f32": 0}
    agree_nontrivial = dict.fromkeys(agree, 0)
    trivial = 0
    score_diff: list[float] = []
    same_choice_independent = same_text_independent = 0
    greedy_same = {"int4 vs q4_0": 0, "onnx f32 vs gguf f32": 0}
    greedy_prefix: dict[str, list[int]] = {k: [] for k in greedy_same}
    for p in range(args.prompts):
        a, b = 3 + 7 * p % 90, 2 + 13 * p % 70
        messages = [{"role": "user", "content": f"What is {a} + {b}? Think step by step."}]
        _, prompt = q4.encode_chat(messages)
        assert i4.encode_chat(messages)[1] == prompt, "the two tokenizers disagree"
        sp = SamplingSettings(temperature=0.8, top_p=0.95, seed=p, logit_bias=bias)
        cands = generate_all(q4, prompt, args.k, sp, gen)
        s_q4 = [c.score or 0.0 for c in cands]
        s_i4 = [i4.score_tokens(prompt + c.token_ids).score for c in cands]
        s_32 = [o32.score_tokens(prompt + c.token_ids).score for c in cands]
        picks = {"q4_0": best(s_q4), "int4": best(s_i4), "f32": best(s_32)}
        pairs = {
            "int4 vs q4_0": picks["int4"] == picks["q4_0"],
            "int4 vs f32": picks["int4"] == picks["f32"],
            "q4_0 vs f32": picks["q4_0"] == picks["f32"],
        }
        trivial += len(set(s_32)) == 1
        for name, same in pairs.items():
            agree[name] += same
            agree_nontrivial[name] += same and len(set(s_32)) > 1
        score_diff += [abs(x - y) for x, y in zip(s_i4, s_q4, strict=True)]
        own = generate_all(i4, prompt, args.k, sp, gen)
        own_pick = best([c.score or 0.0 for c in own])
        same_choice_independent += own_pick == picks["q4_0"]
        same_text_independent += own[own_pick].token_ids == cands[picks["q4_0"]].token_ids
        greedy = SamplingSettings(temperature=0)  # no step bias: biased greedy just repeats it
        for name, (x, y) in {"int4 vs q4_0": (i4, q4), "onnx f32 vs gguf f32": (o32, g32)}.items():
            tx = generate_all(x, prompt, 1, greedy, gen)[0].token_ids
            ty = generate_all(y, prompt, 1, greedy, gen)[0].token_ids
            greedy_same[name] += tx == ty
            greedy_prefix[name].append(prefix(tx, ty))
    n = args.prompts
    print(f"model {args.hf_dir}, {n} prompts, k={args.k}, {args.tokens} tokens, T=0.8 top-p 0.95, "
          f"step delimiter bias +{args.step_bias}")  # fmt: skip
    print(f"{q4.runtime} | {i4.runtime}")
    print()
    print("1. best-of-k choice on the same (Q4_0-sampled) candidates, agreement rate:")
    for name, v in agree.items():
        m = agree_nontrivial[name]
        print(f"   {name}: {v}/{n} = {v / n:.2f}; leaving out the {trivial} prompts whose "
              f"candidates all had one f32 score (no steps): {m}/{n - trivial}")  # fmt: skip
    print(f"   mean |trajectory score int4 - q4_0|: {statistics.mean(score_diff):.4f}")
    print("2. independent runs at the same seed (each runtime samples its own candidates):")
    print(f"   same chosen index: {same_choice_independent}/{n}; chosen candidate token-identical: "
          f"{same_text_independent}/{n}")  # fmt: skip
    print(f"3. greedy k=1, {args.tokens} tokens:")
    for name in greedy_same:
        print(f"   {name}: identical {greedy_same[name]}/{n}, mean common prefix "
              f"{statistics.mean(greedy_prefix[name]):.1f} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
