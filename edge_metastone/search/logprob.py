"""The policy's own confidence: the candidate with the highest mean token log-probability."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from edge_metastone.engine.generate import GenerationSettings
from edge_metastone.engine.sampling import SamplingSettings
from edge_metastone.search.base import (
    EventHook,
    SearchEngine,
    SearchResult,
    StrategyName,
    position_of,
    run_candidates,
    select_by_logprob,
)


class LogProb:
    """Best-of-k by mean token log-probability (no head needed)."""

    name = StrategyName.LOGPROB

    def search(
        self,
        engine: SearchEngine,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        deadline: float | None = None,
        on_event: EventHook | None = None,
    ) -> SearchResult:
        """Run and select."""
        settings = dataclasses.replace(settings, logprobs=True)
        cands, early = run_candidates(
            engine, prompt_ids, k, sampling, settings, deadline=deadline, on_event=on_event
        )
        best = select_by_logprob(cands)
        reason = f"highest mean token log-probability of {k}"
        return SearchResult(cands, position_of(cands, best), self.name, reason, early)
