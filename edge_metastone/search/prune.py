"""SPRM-guided step pruning: at step boundaries, stop candidates whose running score has fallen
well behind the leaders, so their remaining tokens are never generated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_metastone.backend import Backend
from edge_metastone.errors import InvalidRequestError
from edge_metastone.search.base import (
    EventHook,
    StrategyName,
    select_by_score,
)
from edge_metastone.search.best_of_k import BestOfK
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import (
    Candidate,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
)


@dataclass
class PruneRule:
    """Drop a candidate once it has `min_steps` steps and its running score is below
    `ratio` x the best running score among candidates with as many steps; keep `keep` alive."""

    k: int
    min_steps: int = 3
    ratio: float = 0.6
    keep: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise InvalidRequestError("prune ratio must be in (0, 1]")
        self.running: dict[int, tuple[int, float]] = {}
        self.pruned: set[int] = set()
        self.finished: set[int] = set()

    def on_step(self, ev: StepEvent, control: GenerationControl) -> list[int]:
        """Record a step; prune and return the candidates that fell behind."""
        self.running[ev.candidate] = (ev.n_steps, ev.running_score)
        live = [c for c in range(self.k) if c not in self.pruned and c not in self.finished]
        if len(live) <= self.keep:
            return []
        mature = {
            c: self.running[c] for c in live if self.running.get(c, (0, 0.0))[0] >= self.min_steps
        }
        if len(mature) < 2:
            return []
        leader = max(s for _, s in mature.values())
        behind = sorted((s, c) for c, (_, s) in mature.items() if s < self.ratio * leader)
        dropped = []
        for _, c in behind:  # worst first, never below `keep` live candidates
            if len(live) - len(dropped) <= self.keep:
                break
            dropped.append(c)
        for c in dropped:
            self.pruned.add(c)
            control.prune(c)
        return dropped


class StepPruning(SelectingStrategy):
    """Best-of-k with early pruning of candidates whose step scores fall well behind."""

    name = StrategyName.PRUNE

    def __init__(self, min_steps: int = 3, ratio: float = 0.6, keep: int = 2) -> None:
        self.min_steps, self.ratio, self.keep = min_steps, ratio, keep
        self.rule: PruneRule | None = None

    def run(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        deadline: float | None = None,
        on_event: EventHook | None = None,
        control: GenerationControl | None = None,
    ) -> tuple[list[Candidate], bool]:
        """Run with pruning (plain best-of-k when the model cannot score steps)."""
        args = (backend, prompt_ids, k, sampling, settings)
        if not (backend.has_head and settings.score_steps):
            self.rule = None
            return BestOfK().run(*args, deadline=deadline, on_event=on_event, control=control)
        self.rule = PruneRule(k, self.min_steps, self.ratio, self.keep)  # fresh per run
        return super().run(*args, deadline=deadline, on_event=on_event, control=control)

    def on_step(self, ev: StepEvent, control: GenerationControl) -> None:
        """Prune laggards at this step boundary."""
        if self.rule is not None:
            self.rule.on_step(ev, control)

    def on_finish(self, c: Candidate) -> None:
        """A finished candidate can no longer be pruned."""
        if self.rule is not None:
            self.rule.finished.add(c.index)

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """Best trajectory score among the survivors."""
        if self.rule is None:
            return BestOfK().select(backend, cands, k)
        n = len(self.rule.pruned) if self.rule else 0
        return select_by_score(
            cands
        ), f"highest SPRM trajectory score; {n} of {k} pruned at step boundaries"
