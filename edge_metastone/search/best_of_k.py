"""Best-of-k by SPRM trajectory score (the paper's); by log-probability when there is no head."""

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
    select_by_score,
)


class BestOfK:
    """Generate k candidates, keep the one with the best step scores."""

    name = StrategyName.BEST_OF_K

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
        use_head = engine.has_head and settings.score_steps
        if not use_head:
            settings = dataclasses.replace(settings, logprobs=True)
        cands, early = run_candidates(
            engine, prompt_ids, k, sampling, settings, deadline=deadline, on_event=on_event
        )
        if use_head:
            best = select_by_score(cands)
            reason = f"highest SPRM trajectory score of {k}"
        else:
            best = select_by_logprob(cands)
            reason = f"no SPRM head: highest mean token log-probability of {k}"
        return SearchResult(cands, position_of(cands, best), self.name, reason, early)
