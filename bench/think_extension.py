"""s1's "Wait" on the embedded model: does extending a thought help it? A minimum thinking length
suppresses the end of thinking until it is reached: each `</think>` a candidate samples before
then is replaced by a continuation cue (s1 appends "Wait"), and it thinks on.

    python bench/think_extension.py [--problems 300] [--seed 7171] [--min 24,40] [--cue " Wait,"]

The package does not carry this knob: it did not help this model (the closing note of issue 34
and the README's "Thinking budget" section give the numbers), so the experiment patches the decode
loop here instead. The patch replaces a sampled `</think>` by the cue's first token and writes the
rest of the cue in the next steps, the way a thinking budget writes its message (the sampler's
repetition history keeps the sampled token; the embedded model samples with no repetition
penalty). Each setting runs 32 candidates per problem in one batch, as bench/thinking_scaling.py
does, and is read at k=1 and k=8 by the model's default selector and by majority vote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from thinking_scaling import VOTE, collect, grid_points  # noqa: E402

from edge_metastone.decode import loop  # noqa: E402
from edge_metastone.reasoner import Reasoner  # noqa: E402

_pending: dict[int, list[int]] = {}  # id(candidate stream) -> the rest of its cue
SETTING = {"min": 0, "cue": ()}
_sample, _forced = loop._next_token, loop.forced_token


def _next_token(seq, steps, control):
    tok = _sample(seq, steps, control)
    end = seq.run.rule.think_end_id
    if tok == end and id(seq) not in _pending and seq.thought < SETTING["min"]:
        cue = list(SETTING["cue"])
        _pending[id(seq)] = cue[1:]
        return cue[0]
    return tok


def _forced_token(seq):
    rest = _pending.get(id(seq))
    if rest:
        return rest.pop(0)
    _pending.pop(id(seq), None)
    return _forced(seq)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7171)
    ap.add_argument("--min", default="24,40", help="minimum thinking lengths to try")
    ap.add_argument("--cue", default=" Wait,")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args(argv)
    loop._next_token, loop.forced_token = _next_token, _forced_token
    with Reasoner() as r:
        SETTING["cue"] = tuple(r.backend.tokenize_text(args.cue))
        print(
            f"{r.model_path.name}: {args.problems} problems (seed {args.seed}), cue {args.cue!r} "
            f"= {len(SETTING['cue'])} tokens, T={r.sampling.temperature}, selector "
            f"{r.default_strategy.value}, max_new_tokens {args.max_new_tokens}"
        )
        print(f"{'min thinking':>12} {'k':>3} {'accuracy':>9} {'majority':>9} {'thought':>8}")
        for m in [0, *(int(x) for x in args.min.split(","))]:
            SETTING["min"] = m
            data = {None: collect(r, args.seed, args.problems, None, args.max_new_tokens)}
            _pending.clear()
            for row in grid_points(r, data, r.default_strategy.value):
                if row["k"] in (1, 8):
                    print(
                        f"{m or 'none':>12} {row['k']:3d} {row['accuracy']:9.3f} "
                        f"{row[VOTE]:9.3f} {row['thought']:8.1f}",
                        flush=True,
                    )
            t = [x for p in data[None] for x in p["thought"]]
            print(f"{'':>12} thought per candidate: median {statistics.median(t)}")


if __name__ == "__main__":
    main()
