"""Where the in-stream scoring's cost goes: one llama.cpp decode step of k sequences, timed side by
side with no eval callback and with each kind of callback.

    python bench/capture_overhead.py /tmp/syn200m-q4_0.gguf [--k 1,2,8] [--steps 100] [--rounds 5]

Variants (the same context settings, tokens and threads; rounds alternate their order):
  none        no callback: llama.cpp computes each graph in one piece
  py-ask      the Python callback, asked about every node, claiming none (its call cost only)
  py-capture  the Python callback capturing l_out-{L-2} (the engine before the C callback)
  c-ask       the C callback claiming none (its call cost only)
  c-capture   the C callback capturing l_out-{L-2} (the engine now): the graph splits in two
              at the captured node, and the rows are copied out
So py-ask - none is the Python callbacks' cost, c-capture - c-ask the split and the copy.
Feature rows are checked (k per decode) so no variant skips work. Run it alone: llama.cpp's decode
threads busy-wait, and another process on the cores distorts every number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp

from edge_metastone.engine.capture import FeatureCapture, native_available
from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
from edge_metastone.limits import default_threads

VARIANTS = ("none", "py-ask", "py-capture", "c-ask", "c-capture")
PROMPT = list(range(100, 132))


def decode_seconds(model: Model, variant: str, k: int, steps: int, threads: int) -> float:
    """Median seconds of one k-sequence decode step over `steps` steps."""
    layer = model.n_layer - 2
    cap = None
    if variant != "none":
        native = variant.startswith("c-")
        target = layer if variant.endswith("capture") else 10_000  # "l_out-10000": no such node
        cap = FeatureCapture(target, model.n_embd, capacity=max(32, k), native=native)
    settings = ContextSettings(
        n_ctx=len(PROMPT) + k * (steps + 1), n_batch=max(32, k), n_seq_max=k, n_threads=threads
    )
    times = []
    with (
        Context(
            model,
            settings,
            cb_eval=cap.callback if cap else None,
            cb_user_data=cap.user_data if cap else None,
        ) as ctx,
        Batch(max(32, k)) as batch,
    ):
        for _ in ctx.prefill(batch, PROMPT):
            if cap:
                cap.take()
        for s in range(1, k):
            llama_cpp.llama_memory_seq_cp(ctx.memory, 0, s, -1, -1)
        for i in range(steps):
            batch.clear()
            for s in range(k):
                batch.add(200 + (7 * i + s) % 1000, len(PROMPT) + i, (s,), True)
            t0 = time.perf_counter()
            ctx.decode(batch)
            if cap:
                rows = cap.take()
                want = k if variant.endswith("capture") else 0
                assert rows.shape[0] == want, (variant, rows.shape)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--k", default="1,2,8")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if not native_available():
        sys.exit("the C feature capture is not built (pip install -e . with a C compiler)")
    threads = args.threads or default_threads()
    model = Model(args.model)
    print(
        f"model {args.model.name}: {model.n_layer} layers, n_embd {model.n_embd}, threads "
        f"{threads}, {args.steps} decode steps per run, rounds {args.rounds}, medians"
    )
    for k in (int(x) for x in args.k.split(",")):
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                runs[v].append(decode_seconds(model, v, k, args.steps, threads))
        med = {v: statistics.median(t) for v, t in runs.items()}
        base = med["none"]
        cells = "  ".join(f"{v} {med[v] * 1e3:6.2f} ms ({med[v] / base:.3f})" for v in VARIANTS)
        print(f"k={k:2d}: {cells}")
        print(
            f"       python callbacks {(med['py-ask'] - base) * 1e3:+.3f} ms, "
            f"C callbacks {(med['c-ask'] - base) * 1e3:+.3f} ms, "
            f"split + copy {(med['c-capture'] - med['c-ask']) * 1e3:+.3f} ms per decode"
        )
    model.close()


if __name__ == "__main__":
    main()
