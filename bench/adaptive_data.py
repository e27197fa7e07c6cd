"""Generate and keep the candidates that adaptive compute is measured on: k candidates per problem
with token log-probabilities, one batch each, by the model's default sampling.

Used by bench/adaptive.py (fresh problems) and examples/nano/record_adaptive.py (the validation
split); `save` and `load` keep them as JSON so a refit never regenerates them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))
sys.path.insert(0, str(REPO))

from task import problems  # noqa: E402

from edge_metastone.reasoner import Reasoner  # noqa: E402
from edge_metastone.training.adaptive_fit import RecordedRun  # noqa: E402
from edge_metastone.types import Candidate, FinishReason, GenerationSettings  # noqa: E402

_FIELDS = ("index", "token_ids", "text", "score", "mean_logprob", "token_logprobs")


def save(probs: list[RecordedRun], path: Path) -> None:
    """The problems and their candidates as JSON."""
    rows = [
        {
            "gold": p.gold,
            "candidates": [
                {**{f: getattr(c, f) for f in _FIELDS}, "finish_reason": c.finish_reason.value}
                for c in p.candidates
            ],
        }
        for p in probs
    ]
    path.write_text(json.dumps(rows))


def load(path: Path) -> list[RecordedRun]:
    """What `save` wrote."""
    out = []
    for row in json.loads(path.read_text()):
        cands = [
            Candidate(
                step_positions=[],
                step_scores=[],
                finish_reason=FinishReason(c["finish_reason"]),
                **{f: c[f] for f in _FIELDS},
            )
            for c in row["candidates"]
        ]
        out.append(RecordedRun(cands, row["gold"]))
    return out


def collect(
    r: Reasoner, seed: int, n: int, k: int = 32, max_new_tokens: int = 256, log=print
) -> list[RecordedRun]:
    """n problems of `seed`, each with k candidates (problem i samples with seed i)."""
    out = []
    t0 = time.perf_counter()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, logprobs=True)
    for i, p in enumerate(problems(seed, n)):
        _, ids = r.encode(p.prompt)
        sampling = dataclasses.replace(r.sampling, seed=i)
        cands = r.backend.generate_all(ids, k, sampling, settings)
        out.append(RecordedRun(cands, str(p.answer)))
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{n} problems, {time.perf_counter() - t0:.0f} s")
    return out
