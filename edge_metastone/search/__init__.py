"""Test-time search strategies: one module each, all behind `Strategy` (see base.py)."""

from __future__ import annotations

from edge_metastone.search.base import Strategy, StrategyName
from edge_metastone.search.best_of_k import BestOfK
from edge_metastone.search.combined import Combined, Selector
from edge_metastone.search.confidence import ConfidenceVote
from edge_metastone.search.logprob import LogProb
from edge_metastone.search.prune import StepPruning
from edge_metastone.search.vote import Vote

STRATEGIES: dict[StrategyName, type] = {
    StrategyName.BEST_OF_K: BestOfK,
    StrategyName.PRUNE: StepPruning,
    StrategyName.VOTE: Vote,
    StrategyName.WEIGHTED_VOTE: Vote,
    StrategyName.LOGPROB: LogProb,
    StrategyName.CONFIDENCE_VOTE: ConfidenceVote,
    StrategyName.COMBINED: Combined,
    StrategyName.COMBINED_VOTE: Combined,
}


def make_strategy(name: StrategyName | str, selector: Selector | None = None) -> Strategy:
    """The strategy object for a name; the combined ones choose by `selector` (None: the one
    the backend's model records, read when they run)."""
    name = StrategyName(name)
    if name is StrategyName.WEIGHTED_VOTE:
        return Vote(weighted=True)
    if name is StrategyName.COMBINED_VOTE:
        return Combined(vote=True, selector=selector)
    if name is StrategyName.COMBINED:
        return Combined(selector=selector)
    return STRATEGIES[name]()
