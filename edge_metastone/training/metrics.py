"""How well a head (or any candidate signal) separates right from wrong: AUC pooled and within
problem, and best-of-k accuracy by each selector. Pure numpy; no torch, no engine."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_metastone.answers import answers_equivalent
from edge_metastone.search.base import StrategyName, argmax_lowest_index
from edge_metastone.search.vote import vote


def auc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties count 1/2 (Mann-Whitney).
    None when one class is missing."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def within_auc(
    groups: Sequence[Sequence[float]], labels: Sequence[Sequence[float]]
) -> tuple[float | None, int]:
    """Mean AUC over the groups (problems) that hold both classes, and how many did."""
    values = [a for g, y in zip(groups, labels, strict=True) if (a := auc(g, y)) is not None]
    return (float(np.mean(values)) if values else None), len(values)


@dataclass(frozen=True)
class ProblemSamples:
    """One problem's k candidates as the report needs them."""

    answers: list[str]
    correct: list[bool]
    score: list[float]  # trajectory score by the head under test
    mean_logprob: list[float]
    step_scores: list[list[float]]
    token_logprobs: list[list[float]] | None = None  # per candidate (the combined selector's)


Chooser = Callable[[ProblemSamples], int]  # the index of the candidate a strategy keeps


def by_value(values: Sequence[float]) -> int:
    """Index of the highest value, ties to the lowest index."""
    return argmax_lowest_index(list(enumerate(float(v) for v in values)))


def _majority(p: ProblemSamples) -> int:
    return vote(p.answers, [1.0] * len(p.answers), list(range(len(p.answers))))


# What each strategy that needs no fitted selector keeps, on recorded candidates: the same choice
# the Reasoner makes with that strategy (keyed by the strategy, in the API's and CLI's names).
CHOOSERS: dict[StrategyName, Chooser] = {
    StrategyName.BEST_OF_K: lambda p: by_value(p.score),
    StrategyName.VOTE: _majority,
    StrategyName.WEIGHTED_VOTE: lambda p: vote(p.answers, p.score, list(range(len(p.answers)))),
    StrategyName.LOGPROB: lambda p: by_value(p.mean_logprob),
}


def selection_report(problems: Sequence[ProblemSamples]) -> dict[str, float]:
    """Accuracy per strategy (`CHOOSERS`, by the strategy's name), random choice (expected
    pass@1, "random") and the oracle pass@k ("oracle")."""
    if not problems:
        return {}
    out = {
        name.value: float(np.mean([p.correct[choose(p)] for p in problems]))
        for name, choose in CHOOSERS.items()
    }
    out["random"] = float(np.mean([np.mean(p.correct) for p in problems]))
    out["oracle"] = float(np.mean([any(p.correct) for p in problems]))
    return out


def auc_report(problems: Sequence[ProblemSamples]) -> dict[str, float | int | None]:
    """Step- and trajectory-level AUC, pooled and within problem (labels: candidate correctness)."""
    traj = [p.score for p in problems]
    traj_y = [[float(c) for c in p.correct] for p in problems]
    steps = [[s for ss in p.step_scores for s in ss] for p in problems]
    steps_y = [
        [float(c) for c, ss in zip(p.correct, p.step_scores, strict=True) for _ in ss]
        for p in problems
    ]
    lp = [p.mean_logprob for p in problems]
    flat = lambda xs: [x for g in xs for x in g]  # noqa: E731
    w_traj, n_traj = within_auc(traj, traj_y)
    w_step, n_step = within_auc(steps, steps_y)
    w_lp, _ = within_auc(lp, traj_y)
    return {
        "trajectory_auc": auc(flat(traj), flat(traj_y)),
        "trajectory_auc_within": w_traj,
        "step_auc": auc(flat(steps), flat(steps_y)),
        "step_auc_within": w_step,
        "logprob_auc_within": w_lp,
        "problems_with_both_classes": n_traj,
        "problems_with_both_classes_steps": n_step,
    }


def samples_from_result(result, gold: str) -> ProblemSamples:
    """A `ReasonResult`'s candidates as the report sees them (truncated candidates are wrong)."""
    cands = result.candidates
    return ProblemSamples(
        answers=[c.answer for c in cands],
        correct=[not c.truncated and answers_equivalent(c.answer, gold) for c in cands],
        score=[c.score if c.score is not None else 0.0 for c in cands],
        mean_logprob=[c.mean_logprob if c.mean_logprob is not None else -math.inf for c in cands],
        step_scores=[list(c.step_scores) for c in cands],
    )
