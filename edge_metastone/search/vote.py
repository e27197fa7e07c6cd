"""Majority vote over extracted answers, optionally weighted by SPRM trajectory score."""

from __future__ import annotations

from collections.abc import Sequence

from edge_metastone.answers import extract_answer, group_answers
from edge_metastone.backend import Backend
from edge_metastone.search.base import (
    StrategyName,
    argmax_lowest_index,
    selection_pool,
)
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import Candidate


def vote(answers: Sequence[str], weights: Sequence[float], indices: Sequence[int]) -> int:
    """Index of the chosen candidate: the heaviest answer class (ties: the class holding the lowest
    index), then its heaviest member (ties: lowest index). Empty answers never win over real ones."""
    labels = group_answers(list(answers))
    totals: dict[int, float] = {}
    for pos, label in enumerate(labels):
        if answers[pos].strip():
            totals[label] = totals.get(label, 0.0) + weights[pos]
    if not totals:  # nobody answered: fall back to the heaviest single candidate
        return argmax_lowest_index(list(zip(indices, weights, strict=True)))
    winner = argmax_lowest_index([(indices[label], t) for label, t in totals.items()])
    win_label = next(label for label in totals if indices[label] == winner)
    members = [(indices[p], weights[p]) for p, lab in enumerate(labels) if lab == win_label]
    return argmax_lowest_index(members)


class Vote(SelectingStrategy):
    """Majority (or SPRM-weighted) vote over the answers after `</think>`."""

    def __init__(self, weighted: bool = False) -> None:
        self.weighted = weighted
        self.name = StrategyName.WEIGHTED_VOTE if weighted else StrategyName.VOTE

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """Vote among the eligible candidates."""
        pool = selection_pool(cands)
        weighted = self.weighted and backend.has_head
        best = vote(
            [extract_answer(c.text) for c in pool],
            [_weight(c, weighted) for c in pool],
            [c.index for c in pool],
        )
        kind = "SPRM-weighted vote" if weighted else "majority vote"
        return best, f"{kind} over {len(pool)} answers"


def _weight(c: Candidate, weighted: bool) -> float:
    if not weighted:
        return 1.0
    return c.score if c.score is not None else 0.0
