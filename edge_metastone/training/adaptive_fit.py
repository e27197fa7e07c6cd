"""Measure adaptive compute offline: replay a policy (waves, stopping rule, online termination,
selector) on candidates generated once at max_k, and fit a model's recorded settings.

The replay is exact for tokens: candidate i of a wave is candidate i of the full run (seed
(seed, i), tests/test_adaptive.py checks waves equal one batch), and online termination keeps a
prefix of its tokens. It runs the package's own rule (`search.adaptive.settled`,
`first_wave_floor`) and selectors, so what it measures is what a request does.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from edge_metastone.answers import answers_equivalent, extract_answer
from edge_metastone.search.adaptive import AdaptiveSettings, first_wave_floor, settled
from edge_metastone.search.base import StrategyName
from edge_metastone.search.confidence import window_means
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import Candidate, FinishReason


@dataclass(frozen=True)
class RecordedRun:
    """One problem's candidates from one run at max_k (with token log-probabilities)."""

    candidates: list[Candidate]
    gold: str


@dataclass(frozen=True)
class PolicyOutcome:
    """A policy over a problem set: accuracy, generated tokens, candidates run per problem."""

    accuracy: float
    tokens: int
    mean_candidates: float
    reach: tuple[float, ...] = ()  # the share of problems that ran each wave


def correct(c: Candidate, gold: str) -> bool:
    """A finished candidate whose answer equals the gold one."""
    return not c.truncated and answers_equivalent(extract_answer(c.text), gold)


def terminated(c: Candidate, floor: float | None, window: int) -> Candidate:
    """`c` as online termination would leave it: pruned at the first window whose mean falls
    below `floor` (the end-of-turn token is never checked), its tokens a prefix."""
    lp = c.token_logprobs or []
    if floor is None or c.n_tokens < window:
        return c
    # the window ending at generated token t is checked when t is sampled
    below = [j for j, m in enumerate(window_means(lp[: c.n_tokens], window)) if m < floor]
    if not below:
        return c
    keep = below[0] + window - 1
    return dataclasses.replace(
        c,
        token_ids=c.token_ids[:keep],
        text="",  # its text is cut too: it never answers
        finish_reason=FinishReason.PRUNED,
        token_logprobs=lp[: keep + 1],
    )


def replay(
    p: RecordedRun, s: AdaptiveSettings, selector: SelectingStrategy
) -> tuple[bool, int, int]:
    """(chosen candidate correct, tokens generated, candidates run) for one problem."""
    used: list[Candidate] = []
    floor = s.floor
    for w, n in enumerate(s.waves):
        wave = p.candidates[len(used) : n]
        used += [terminated(c, floor if w else None, s.window) for c in wave]
        if settled(used, s)[0]:
            break
        if w == 0 and floor is None and s.calibrate_floor:
            floor = first_wave_floor(used, s)
    best, _ = selector.select(None, used, len(used))  # type: ignore[arg-type]
    chosen = next(c for c in used if c.index == best)
    return correct(chosen, p.gold), sum(c.n_tokens for c in used), len(used)


def evaluate(
    problems: Sequence[RecordedRun], s: AdaptiveSettings, selector: SelectingStrategy
) -> PolicyOutcome:
    """A policy's outcome over the problems."""
    runs = [replay(p, s, selector) for p in problems]
    n = max(len(runs), 1)
    starts = (0, *s.waves[:-1])
    return PolicyOutcome(
        sum(ok for ok, _, _ in runs) / n,
        sum(t for _, t, _ in runs),
        sum(k for _, _, k in runs) / n,
        tuple(sum(k > first for _, _, k in runs) / n for first in starts),
    )


GRID_WAVES = ((2, 8), (2, 8, 32), (3, 8, 32), (2, 4, 8, 16, 32), (4, 16, 32))
GRID_CONSENSUS = (0.6, 0.8, 1.0)
GRID_FLOOR_MARGIN = (None, 0.0, 0.1)  # None: no online termination


def grid(max_k: int = 32) -> list[AdaptiveSettings]:
    """The settings a fit tries."""
    out = []
    for waves, cons, margin in itertools.product(GRID_WAVES, GRID_CONSENSUS, GRID_FLOOR_MARGIN):
        if waves[-1] > max_k:
            continue
        out.append(
            AdaptiveSettings(
                waves=waves,
                consensus=cons,
                calibrate_floor=margin is not None,
                floor_margin=margin or 0.0,
            )
        )
    return out


def fit(
    problems: Sequence[RecordedRun],
    selector: SelectingStrategy,
    reference: float,
    tolerance: float = 0.005,
) -> tuple[AdaptiveSettings, list[tuple[AdaptiveSettings, PolicyOutcome]]]:
    """The grid setting with the fewest tokens whose accuracy is within `tolerance` of
    `reference` (the best fixed effort's); the most accurate one when none is. Also every
    setting's outcome (a Pareto curve)."""
    tried = [(s, evaluate(problems, s, selector)) for s in grid()]
    ok = [t for t in tried if t[1].accuracy >= reference - tolerance]
    best = (
        min(ok, key=lambda t: (t[1].tokens, -t[1].accuracy))
        if ok
        else max(tried, key=lambda t: (t[1].accuracy, -t[1].tokens))
    )
    s, out = best
    name = selector.name if isinstance(selector.name, StrategyName) else StrategyName.LOGPROB
    measured = {
        "problems": len(problems),
        "accuracy": round(out.accuracy, 4),
        "tokens": out.tokens,
        "mean_candidates": round(out.mean_candidates, 2),
        "reach": [round(v, 4) for v in out.reach],
        "reference_accuracy": round(reference, 4),
    }
    return dataclasses.replace(s, selector=name, measured=measured), tried
