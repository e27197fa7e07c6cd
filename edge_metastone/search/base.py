"""What every strategy shares: the backend it runs on, the result type, the event loop with deadlines,
and the selection rules (pure functions over candidates, tested on hand-built scores)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_metastone.backend import Backend
from edge_metastone.types import (
    Candidate,
    Event,
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
    WaveEvent,
)


class StrategyName(str, enum.Enum):
    """The search strategies."""

    BEST_OF_K = "best-of-k"  # the paper's: highest SPRM trajectory score
    PRUNE = "prune"  # best-of-k, dropping candidates whose running score falls well behind
    VOTE = "vote"  # majority vote over extracted answers
    WEIGHTED_VOTE = "weighted-vote"  # vote weighted by SPRM trajectory score
    LOGPROB = "logprob"  # the policy's own mean token log-probability
    CONFIDENCE_VOTE = "confidence-vote"  # vote weighted by the policy's confidence (DeepConf)
    COMBINED = "combined"  # the fitted combination of head and log-probability (search.combined)
    COMBINED_VOTE = "combined-vote"  # vote weighted by that combination's P(right)

    @property
    def is_vote(self) -> bool:
        """The strategy picks the answer most candidates (by some weight) agree on, not one
        candidate by its own number."""
        return self in _VOTES

    @property
    def signal(self) -> str:
        """The number the strategy weighs candidates by: "sprm" (the head's trajectory score),
        "logprob" (the policy's mean token log-probability), "confidence" (its step confidence),
        "combined" (the fitted combination of both) or "count" (a plain majority)."""
        return _SIGNALS[self]


_VOTES = frozenset(
    {
        StrategyName.VOTE,
        StrategyName.WEIGHTED_VOTE,
        StrategyName.CONFIDENCE_VOTE,
        StrategyName.COMBINED_VOTE,
    }
)
_SIGNALS = {
    StrategyName.BEST_OF_K: "sprm",
    StrategyName.PRUNE: "sprm",
    StrategyName.VOTE: "count",
    StrategyName.WEIGHTED_VOTE: "sprm",
    StrategyName.LOGPROB: "logprob",
    StrategyName.CONFIDENCE_VOTE: "confidence",
    StrategyName.COMBINED: "combined",
    StrategyName.COMBINED_VOTE: "combined",
}


@dataclass(frozen=True)
class SearchResult:
    """The candidates (index order), which one was chosen, and why."""

    candidates: list[Candidate]
    chosen: int
    strategy: StrategyName
    reason: str
    early_stop: bool = False
    waves: list[dict[str, int]] = field(default_factory=list)  # adaptive: per wave
    stop_reason: str = ""  # adaptive: why no further wave ran

    @property
    def answer_candidate(self) -> Candidate:
        """The chosen candidate."""
        return self.candidates[self.chosen]

    @property
    def generated_tokens(self) -> int:
        """Tokens generated over all candidates (pruned ones included)."""
        return sum(c.n_tokens for c in self.candidates)


EventHook = Callable[[Event], None]


class Strategy(Protocol):
    """One search strategy: generate k candidates from a prompt (`run`, the backend's part) and
    choose one (`choose`, pure selection); `search` does both."""

    name: StrategyName

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
    ) -> tuple[list[Candidate], bool]: ...

    def choose(
        self, backend: Backend, cands: list[Candidate], k: int, early: bool
    ) -> SearchResult: ...

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
    ) -> SearchResult: ...


def run_candidates(
    backend: Backend,
    prompt_ids: Sequence[int],
    k: int,
    sampling: SamplingSettings,
    settings: GenerationSettings,
    *,
    deadline: float | None = None,
    on_event: EventHook | None = None,
    on_step: Callable[[StepEvent, GenerationControl], None] | None = None,
    on_finish: Callable[[Candidate], None] | None = None,
    on_wave: Callable[[WaveEvent], None] | None = None,
    control: GenerationControl | None = None,
) -> tuple[list[Candidate], bool]:
    """Consume the backend's events; halt before `deadline` (time.monotonic()). Returns (candidates, early_stop).
    `control` is the caller's handle on the run (its timings); a fresh one when not given.
    `on_wave` sees each `WaveEvent` after `on_event` (at a wave's end it may ask for more)."""
    control = control or GenerationControl()
    done: list[Candidate] = []
    last = time.monotonic()
    step_time = 0.0
    seen_in_step: set[int] = set()
    for ev in backend.generate(prompt_ids, k, sampling, settings, control=control):
        if isinstance(ev, WaveEvent):
            if on_event is not None:
                on_event(ev)
            if on_wave is not None:
                on_wave(ev)
            continue
        if on_event is not None:
            on_event(ev)
        if isinstance(ev, FinishEvent):
            done.append(ev.result)
            if on_finish is not None:
                on_finish(ev.result)
        elif isinstance(ev, StepEvent) and on_step is not None:
            on_step(ev, control)
        if deadline is not None and not control.halted:
            # one decode step has passed when a candidate shows up a second time
            cand = getattr(ev, "candidate", None)
            if cand in seen_in_step:
                now = time.monotonic()
                step_time = max(step_time * 0.8, now - last)
                last = now
                seen_in_step.clear()
            seen_in_step.add(cand)
            if time.monotonic() + step_time >= deadline:
                control.halt("the latency budget ran out")
    early = any(c.finish_reason is FinishReason.HALTED for c in done)
    return sorted(done, key=lambda c: c.index), early


def selection_pool(cands: Sequence[Candidate]) -> list[Candidate]:
    """Candidates eligible to be chosen: not pruned; after an early stop, completed ones first."""
    alive = [c for c in cands if c.finish_reason is not FinishReason.PRUNED] or list(cands)
    complete = [c for c in alive if not c.truncated]
    halted = any(c.finish_reason is FinishReason.HALTED for c in alive)
    return complete if halted and complete else alive


def argmax_lowest_index(values: Sequence[tuple[int, float]]) -> int:
    """The index with the highest value; ties go to the lowest index. `values`: (index, value)."""
    if not values:
        raise ValueError("no candidates to choose from")
    best_i, best_v = values[0]
    for i, v in values[1:]:
        if v > best_v or (v == best_v and i < best_i):
            best_i, best_v = i, v
    return best_i


def _select_by(cands: Sequence[Candidate], value: Callable[[Candidate], float | None]) -> int:
    """Highest value among the eligible candidates (None counts as -inf), ties to the lowest index."""
    scored = [(c.index, value(c)) for c in selection_pool(cands)]
    return argmax_lowest_index([(i, float("-inf") if v is None else v) for i, v in scored])


def select_by_score(cands: Sequence[Candidate]) -> int:
    """The paper's rule: highest trajectory score, ties to the lowest index."""
    return _select_by(cands, lambda c: c.score)


def finished_well(c: Candidate) -> bool:
    """It ended its turn (or at a stop string) after writing something."""
    return not c.truncated and bool(c.text.strip())


def select_by_logprob(cands: Sequence[Candidate]) -> int:
    """Highest mean token log-probability among the candidates that finished well (an empty or
    truncated one ranks after every one that did), ties to the lowest index."""
    pool = selection_pool(cands)
    pool = [c for c in pool if finished_well(c)] or pool
    return _select_by(pool, lambda c: c.mean_logprob)


def position_of(cands: Sequence[Candidate], index: int) -> int:
    """Position in `cands` of the candidate with `.index == index`."""
    return next(p for p, c in enumerate(cands) if c.index == index)
