"""Best-of-k by SPRM trajectory score (the paper's); by log-probability when there is no head."""

from __future__ import annotations

import dataclasses

from edge_metastone.backend import Backend
from edge_metastone.search.base import (
    StrategyName,
    select_by_logprob,
    select_by_score,
)
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import Candidate, GenerationSettings


class BestOfK(SelectingStrategy):
    """Generate k candidates, keep the one with the best step scores."""

    name = StrategyName.BEST_OF_K

    def prepare(self, backend: Backend, settings: GenerationSettings) -> GenerationSettings:
        """Without a head, fall back to log-probabilities."""
        if backend.has_head and settings.score_steps:
            return settings
        return dataclasses.replace(settings, logprobs=True)

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """Highest trajectory score (ties: lowest index)."""
        if any(c.score is not None for c in cands):
            return select_by_score(cands), f"highest SPRM trajectory score of {k}"
        return select_by_logprob(cands), f"no SPRM head: highest mean token log-probability of {k}"
