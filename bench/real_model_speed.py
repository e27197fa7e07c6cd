"""Single-sequence decode speed on the real model (SmolLM2-135M-Instruct Q4_1, tests/real_model.py):
our engine at k=1 against stock llama-cpp-python's `Llama.generate`, same file, threads, prompt,
token count and greedy decoding, measured side by side in this process.

    python bench/real_model_speed.py [--tokens 256] [--rounds 5] [--threads 2] [--head SIDECAR]

End-of-turn tokens are banned on our side so both sides run the full `--tokens` (`Llama.generate`
does not stop at them by itself). Each side's time covers the prompt's prefill and every decode.
Rounds alternate the two sides; the median of the per-round ratios is reported (target >= 0.95).
Run it alone (under the CPU lock on a shared machine): llama.cpp's threads busy-wait.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from real_model import smollm2_gguf  # noqa: E402
from runtime import side_by_side  # noqa: E402  (bench/runtime.py: alternating rounds)
from stock_llama import stock_defaults  # noqa: E402

from edge_metastone.engine.engine import Engine  # noqa: E402
from edge_metastone.kvpolicy import flash_attention, kv_cells  # noqa: E402
from edge_metastone.limits import PREFILL_BATCH, default_threads  # noqa: E402
from edge_metastone.types import (  # noqa: E402
    GenerationSettings,
    KVLayout,
    KVType,
    SamplingSettings,
)

PROMPT = [
    {
        "role": "user",
        "content": "Add the numbers, one step per line, then give the answer.\n\n"
        "2+3+4\n2+3=5\n5+4=9\nAnswer: 9\n\n6+1+2",
    }
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the pinned SmolLM2 file")
    ap.add_argument("--head", type=Path, default=None, help="a sidecar head: score steps too")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    path = args.model or smollm2_gguf()
    threads = args.threads or default_threads()
    n = args.tokens

    import llama_cpp

    engine = Engine(path, head_path=args.head, n_threads=threads)
    plan = engine.model.weight_plan
    with stock_defaults(path, plan.mode):  # the engine's weight-buffer mode on both sides
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=1024,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            logits_all=False,
        )
    _, prompt = engine.encode_chat(PROMPT)
    ban = tuple((t, -1e9) for t in engine.eog_ids)
    greedy = SamplingSettings(temperature=0.0, seed=0, logit_bias=ban)
    settings = GenerationSettings(max_new_tokens=n, score_steps=engine.has_head)

    def ours() -> None:
        (c,) = engine.generate_all(prompt, 1, greedy, settings)
        assert c.n_tokens == n, c.n_tokens

    def theirs() -> None:
        llm.reset()
        for i, _tok in enumerate(llm.generate(prompt, temp=0.0, repeat_penalty=1.0)):
            if i + 1 >= n:
                break

    ours()  # warm up both
    theirs()
    print(
        f"model {path.name}: {engine.model_file.n_params / 1e6:.0f}M params, weights "
        f"{plan.mode.value}, {threads} threads, prompt {len(prompt)} tokens, {n} tokens greedy, "
        f"k=1, scoring {'on' if engine.has_head else 'off'}, rounds {args.rounds}"
    )
    cells = kv_cells(len(prompt), n, 1, KVLayout.UNIFIED)
    batch = min(len(prompt), PREFILL_BATCH)
    fa = flash_attention(KVType.F16, engine.model.n_heads, cells, batch)
    print(
        f"attention: ours {'flash' if fa else 'plain'} (F16 KV, {cells} cells; the engine's rule), "
        f"llama-cpp-python {'flash' if llm.context_params.flash_attn_type == 1 else 'plain'} "
        "(its default)"
    )
    ta, tb, r = side_by_side(ours, theirs, args.rounds)
    print(f"ours           {n / ta:7.1f} tokens/s ({ta:.2f} s)")
    print(f"stock          {n / tb:7.1f} tokens/s ({tb:.2f} s)")
    print(f"ratio ours / stock {1 / r:.3f}   (target >= 0.95; median of per-round ratios)")
    llm.close()
    engine.close()


if __name__ == "__main__":
    main()
