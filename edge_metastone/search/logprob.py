"""The policy's own confidence: the candidate with the highest mean token log-probability."""

from __future__ import annotations

import dataclasses

from edge_metastone.search.base import SearchEngine, StrategyName, select_by_logprob
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import Candidate, GenerationSettings


class LogProb(SelectingStrategy):
    """Best-of-k by mean token log-probability (no head needed)."""

    name = StrategyName.LOGPROB

    def prepare(self, engine: SearchEngine, settings: GenerationSettings) -> GenerationSettings:
        """Ask the engine for log-probabilities."""
        return dataclasses.replace(settings, logprobs=True)

    def select(self, engine: SearchEngine, cands: list[Candidate], k: int) -> tuple[int, str]:
        """Highest mean log-probability (ties: lowest index)."""
        return select_by_logprob(cands), f"highest mean token log-probability of {k}"
