"""Measure MetaStone-nano's adaptive settings on its validation split and record them in the
model file (`metastone.adaptive`, SPEC §2), as build.py's last stage.

    python examples/nano/record_adaptive.py MODEL.gguf OUT.gguf [--seed 2] [--problems 300]

It generates 32 candidates per validation problem once, replays every grid setting of waves,
consensus and online termination on them (edge_metastone.training.adaptive_fit), and records the
setting with the fewest generated tokens whose accuracy is within half a point of high effort's
(32 candidates, the model's default selector).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from adaptive_data import collect, load, save  # noqa: E402

from edge_metastone import keys  # noqa: E402
from edge_metastone.modelfile.copy import write_model_copy  # noqa: E402
from edge_metastone.reasoner import Reasoner  # noqa: E402
from edge_metastone.search import make_strategy  # noqa: E402
from edge_metastone.search.adaptive import AdaptiveSettings  # noqa: E402
from edge_metastone.training.adaptive_fit import evaluate, fit  # noqa: E402


def record(
    model: Path,
    out: Path,
    seed: int,
    n: int,
    cache: Path | None = None,
    max_new_tokens: int = 256,
) -> AdaptiveSettings:
    """Fit on the validation split and write `out` with the key (`cache`: the candidates, kept
    as JSON and reused)."""
    with Reasoner(model) as r:
        selector = make_strategy(r.default_strategy)
        if cache is not None and cache.is_file():
            probs = load(cache)
        else:
            print(f"generating 32 candidates for {n} validation problems (seed {seed})")
            probs = collect(r, seed, n, max_new_tokens=max_new_tokens)
            if cache is not None:
                save(probs, cache)
    high = evaluate(probs, AdaptiveSettings(waves=(32,)), selector)
    best, _ = fit(probs, selector, high.accuracy)
    best.measured.update(
        {"seed": seed, "high_accuracy": round(high.accuracy, 4), "high_tokens": high.tokens}
    )
    write_model_copy(model, out, extra={keys.ADAPTIVE: best.to_json()})
    print(json.dumps(json.loads(best.to_json()), indent=1))
    return best


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--cache", type=Path, help="keep (and reuse) the candidates in this JSON file")
    args = ap.parse_args(argv)
    record(args.model, args.out, args.seed, args.problems, args.cache)


if __name__ == "__main__":
    main()
