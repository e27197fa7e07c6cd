"""`python -m edge_metastone.engine.canary MODEL [--weight-buffers MODE]`: load a model and decode a
few tokens, in a process of its own, so that the parent learns whether this build, CPU and
weight-buffer mode run, and a crash ends only this child. Prints one JSON line on success."""

from __future__ import annotations

import argparse
import json
import sys
import time

PROMPT_TOKENS = 32  # a prompt-sized batch (the graph the first decode of a request runs)
DECODE_TOKENS = 8  # then single-token decodes, as generation runs


def decode(model_path: str, weight_buffers: str | None, gpu_layers: int) -> str:
    """Load, prefill PROMPT_TOKENS, decode DECODE_TOKENS greedily; a one-line report."""
    import numpy as np

    from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model

    t0 = time.perf_counter()
    with Model(model_path, n_gpu_layers=gpu_layers, weight_buffers=weight_buffers) as model:
        n = PROMPT_TOKENS + DECODE_TOKENS
        ids = model.tokenize("What is (17+25)*3-40? Think step by step. " * 4)[:PROMPT_TOKENS]
        ids += [0] * (PROMPT_TOKENS - len(ids))
        with (
            Context(model, ContextSettings(n_ctx=n + 8, n_batch=PROMPT_TOKENS)) as ctx,
            Batch(PROMPT_TOKENS) as batch,
        ):
            for _ in ctx.prefill(batch, ids):
                pass
            for pos in range(PROMPT_TOKENS, n):
                logits = ctx.logits(len(batch) - 1)
                if not np.isfinite(logits).all():
                    raise SystemExit("the logits are not finite")
                batch.clear()
                batch.add(int(np.argmax(logits)), pos, (0,), True)
                ctx.decode(batch)
        plan = model.weight_plan
    dt = time.perf_counter() - t0
    return f"decoded {n} tokens in {dt:.2f} s ({plan.mode.value} weight buffers)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--weight-buffers", default=None)
    ap.add_argument("--gpu-layers", type=int, default=0)
    args = ap.parse_args()
    print(
        json.dumps({"ok": True, "detail": decode(args.model, args.weight_buffers, args.gpu_layers)})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
