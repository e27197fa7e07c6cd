"""The policy's own confidence: the candidate with the highest mean token log-probability."""

from __future__ import annotations

import dataclasses

from edge_metastone.backend import Backend
from edge_metastone.search.base import StrategyName, select_by_logprob
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import Candidate, GenerationSettings


class LogProb(SelectingStrategy):
    """Best-of-k by mean token log-probability (no head needed)."""

    name = StrategyName.LOGPROB

    def prepare(self, backend: Backend, settings: GenerationSettings) -> GenerationSettings:
        """Ask the backend for log-probabilities."""
        return dataclasses.replace(settings, logprobs=True)

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """Highest mean log-probability (ties: lowest index)."""
        return select_by_logprob(cands), f"highest mean token log-probability of {k}"
