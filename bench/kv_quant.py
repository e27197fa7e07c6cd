"""A quantized KV cache's effect on step scores and on best-of-k selection, against the F16 cache.

    python bench/kv_quant.py /tmp/syn200m-q4_0.gguf [--prompts 6] [--k 8] [--tokens 256]

Candidates are generated once (F16 KV). Each is then scored in one pass over its full token
sequence with an F16, a q8_0 and a q4_0 KV cache: the same tokens, so any difference in the step
scores is the cache's. Reported: the max and mean |step score difference| against F16, and how
often best-of-k (highest trajectory score) picks the same candidate as with F16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_metastone.engine.engine import Engine
from edge_metastone.engine.scoring import score_tokens
from edge_metastone.limits import default_threads
from edge_metastone.types import GenerationSettings, SamplingSettings

KV_TYPES = ("q8_0", "q4_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--step-bias", type=float, default=5.0)
    args = ap.parse_args()
    engine = Engine(args.model, n_threads=default_threads())
    mf, model = engine.model_file, engine.model
    ban = tuple((t, -1e9) for t in engine.eog_ids)
    bias = ban + tuple((t, args.step_bias) for t in engine.rule.step_token_ids)
    gen = GenerationSettings(max_new_tokens=args.tokens)
    diffs: dict[str, list[float]] = {kv: [] for kv in KV_TYPES}
    same: dict[str, int] = dict.fromkeys(KV_TYPES, 0)
    for p in range(args.prompts):
        msgs = [{"role": "user", "content": f"Problem {p}: add {17 * p + 3} and {29 * p + 5}."}]
        prompt = engine.encode_chat(msgs)[1]
        sampling = SamplingSettings(temperature=1.0, top_p=0.95, top_k=40, seed=p, logit_bias=bias)
        cands = engine.generate_all(prompt, args.k, sampling, gen)
        ref = [score_tokens(mf, model, prompt + c.token_ids, parity=False) for c in cands]
        best = int(np.argmax([r.score for r in ref]))
        for kv in KV_TYPES:
            got = [
                score_tokens(mf, model, prompt + c.token_ids, parity=False, kv_type=kv)
                for c in cands
            ]
            for g, r in zip(got, ref, strict=True):
                diffs[kv] += list(np.abs(np.subtract(g.step_scores, r.step_scores)))
            same[kv] += int(np.argmax([g.score for g in got])) == best
    print(
        f"model {args.model.name}: {args.prompts} prompts x k={args.k} x {args.tokens} tokens, "
        f"{sum(len(r.step_scores) for r in ref)} steps in the last prompt's candidates"
    )
    for kv in KV_TYPES:
        d = np.asarray(diffs[kv])
        print(
            f"{kv:>5} KV vs F16: |step score diff| max {d.max():.4f}, mean {d.mean():.5f} over "
            f"{d.size} steps; best-of-{args.k} picks the same candidate in "
            f"{same[kv]}/{args.prompts}"
        )
    engine.close()


if __name__ == "__main__":
    main()
