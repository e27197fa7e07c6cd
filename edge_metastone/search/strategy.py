"""The shared shape of a strategy: prepare settings, run the candidates, select one."""

from __future__ import annotations

from collections.abc import Sequence

from edge_metastone.backend import Backend
from edge_metastone.search.base import (
    EventHook,
    SearchResult,
    StrategyName,
    position_of,
    run_candidates,
)
from edge_metastone.types import (
    Candidate,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
)


class SelectingStrategy:
    """Generate k candidates in one batch, then `select`; subclasses choose the rule."""

    name: StrategyName

    def prepare(self, backend: Backend, settings: GenerationSettings) -> GenerationSettings:
        """Adjust generation settings before the run (e.g. ask for log-probabilities)."""
        return settings

    def on_step(self, ev: StepEvent, control: GenerationControl) -> None:
        """Called at every online step score (pruning acts here)."""

    def on_finish(self, c: Candidate) -> None:
        """Called when a candidate ends."""

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """The chosen candidate's `.index` and the reason."""
        raise NotImplementedError

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
        """Generate the candidates (the part that needs the backend): (candidates, early stop)."""
        return run_candidates(
            backend,
            prompt_ids,
            k,
            sampling,
            self.prepare(backend, settings),
            deadline=deadline,
            on_event=on_event,
            on_step=self.on_step,
            on_finish=self.on_finish,
            control=control,
        )

    def choose(self, backend: Backend, cands: list[Candidate], k: int, early: bool) -> SearchResult:
        """Select among finished candidates (no backend work: may run off the model's lock)."""
        best, reason = self.select(backend, cands, k)
        return SearchResult(cands, position_of(cands, best), self.name, reason, early)

    def search(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        deadline: float | None = None,
        on_event: EventHook | None = None,
    ) -> SearchResult:
        """Run the candidates and choose one."""
        cands, early = self.run(
            backend, prompt_ids, k, sampling, settings, deadline=deadline, on_event=on_event
        )
        return self.choose(backend, cands, k, early)
