"""Adaptive test-time compute: candidates in waves over one prompt cache, stopping as soon as the
choice is settled, and doubtful candidates terminated mid-generation.

    wave 1 (e.g. 3 candidates) -> settled? -> wave 2 (up to 8) -> settled? -> ... -> max_k

The stopping rule is a consensus test in the spirit of Early-Stopping Self-Consistency and
DeepConf's consensus threshold: the leading answer's share of a confidence-weighted vote (weights
exp(sharpness x mean token log-probability); sharpness 0 is a plain vote) must reach `consensus`,
with at least `min_agree` candidates behind it. Online termination (DeepConf-online) prunes a
candidate whose mean log-probability over its last `window` tokens falls below `floor`: the
model's recorded floor, or one calibrated from the request's first wave. Pruning by SPRM score
(`prune`) and by confidence are one mechanism: `GenerationControl`'s pruning.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_metastone.answers import extract_answer, group_answers
from edge_metastone.backend import Backend
from edge_metastone.errors import InvalidRequestError
from edge_metastone.search.base import (
    EventHook,
    SearchResult,
    StrategyName,
    finished_well,
    position_of,
    run_candidates,
)
from edge_metastone.search.confidence import DEFAULT_WINDOW, Signal, confidence
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.types import (
    Candidate,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    WaveEvent,
    finite_number,
    whole_number,
)

logger = logging.getLogger(__name__)

MAX_WAVES = 8


@dataclass(frozen=True)
class AdaptiveSettings:
    """How adaptive compute runs; a model records its measured ones (`metastone.adaptive`)."""

    waves: tuple[int, ...] = (3, 8, 32)  # candidates started after each wave (the last: max_k)
    consensus: float = 0.6  # the leader's share of the weighted vote that settles the choice
    min_agree: int = 2  # ... and how many candidates must give the leading answer
    sharpness: float = 0.0  # vote weights exp(sharpness x mean log-probability)
    window: int = DEFAULT_WINDOW  # tokens of running confidence (online termination)
    floor: float | None = None  # running confidence below this is pruned; None: first wave's
    calibrate_floor: bool = True  # without a floor, calibrate one from the first wave
    floor_margin: float = 0.05  # a calibrated floor: the first wave's lowest window minus this
    selector: StrategyName = StrategyName.LOGPROB  # how the final candidate is chosen
    measured: dict[str, Any] = field(default_factory=dict, compare=False)  # validation numbers

    def __post_init__(self) -> None:
        w = tuple(self.waves)
        object.__setattr__(self, "waves", w)
        ok = (
            1 <= len(w) <= MAX_WAVES
            and all(isinstance(n, int) and not isinstance(n, bool) for n in w)
            and w[0] >= 1
            and all(b > a for a, b in itertools.pairwise(w))
        )
        _check(ok, "waves", f"waves must be 1 to {MAX_WAVES} increasing candidate counts")
        _check(0 < self.consensus <= 1, "consensus", "consensus must be in (0, 1]")
        _check(whole_number(self.min_agree, 1), "min_agree", "min_agree must be an integer >= 1")
        _check(finite_number(self.sharpness) and self.sharpness >= 0, "sharpness", "sharpness >= 0")
        _check(whole_number(self.window, 1), "window", "window must be an integer >= 1")
        floor = self.floor
        _check(
            floor is None or (finite_number(floor) and floor <= 0), "floor", "floor must be <= 0"
        )
        _check(finite_number(self.floor_margin), "floor_margin", "floor_margin must be finite")
        try:
            object.__setattr__(self, "selector", StrategyName(self.selector))
        except ValueError as e:
            raise InvalidRequestError(str(e), param="selector") from None

    @property
    def max_k(self) -> int:
        """The most candidates a request runs."""
        return self.waves[-1]

    def capped(self, max_k: int) -> AdaptiveSettings:
        """The waves cut at `max_k` candidates."""
        w = (*tuple(n for n in self.waves if n < max_k), max_k)
        return dataclasses.replace(self, waves=w) if max_k < self.max_k else self

    def to_json(self) -> str:
        """The `metastone.adaptive` value."""
        d = dataclasses.asdict(self)
        d["waves"], d["selector"] = list(self.waves), self.selector.value
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> AdaptiveSettings:
        """A model file's recorded settings; the defaults (with a warning) when they are bad."""
        if not text:
            return cls()
        try:
            d = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        except (ValueError, TypeError, InvalidRequestError) as e:
            logger.warning("ignoring the model's recorded adaptive settings: %s", e)
            return cls()


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


def consensus(cands: Sequence[Candidate], sharpness: float = 0.0) -> tuple[str, float, int, int]:
    """(leading answer, its share of the weighted vote, its candidates, candidates voting) over
    the candidates that finished well; equivalent answers count as one."""
    pool = [c for c in cands if finished_well(c)]
    if not pool:
        return "", 0.0, 0, 0
    conf = [confidence(c, Signal.MEAN) for c in pool]
    top = max(v for v in conf if math.isfinite(v)) if any(map(math.isfinite, conf)) else 0.0
    weights = [math.exp(sharpness * (v - top)) if math.isfinite(v) else 0.0 for v in conf]
    answers = [extract_answer(c.text) for c in pool]
    labels = group_answers(answers)
    mass: dict[int, float] = {}
    count: dict[int, int] = {}
    for label, w in zip(labels, weights, strict=True):
        mass[label] = mass.get(label, 0.0) + w
        count[label] = count.get(label, 0) + 1
    lead = max(mass, key=lambda lab: (mass[lab], count[lab], -lab))
    total = sum(mass.values()) or 1.0
    return answers[lead], mass[lead] / total, count[lead], len(pool)


def settled(cands: Sequence[Candidate], s: AdaptiveSettings) -> tuple[bool, str]:
    """The stopping rule: (settled, why)."""
    answer, share, n_lead, n = consensus(cands, s.sharpness)
    if n == 0:
        return False, "no candidate has finished an answer"
    says = f"{n_lead} of {n} finished candidates answer {answer!r} ({share:.0%} of the vote)"
    if share >= s.consensus and n_lead >= s.min_agree:
        return True, f"settled: {says}"
    return False, f"not settled: {says}"


def first_wave_floor(cands: Sequence[Candidate], s: AdaptiveSettings) -> float | None:
    """A floor from the first wave: its least confident finished candidate's lowest window,
    minus the margin (DeepConf's warm-up, keeping everything as confident as the warm-up)."""
    lows = [confidence(c, Signal.LOWEST, s.window) for c in cands if finished_well(c)]
    lows = [v for v in lows if math.isfinite(v)]
    return min(lows) - s.floor_margin if lows else None


@dataclass
class WaveLog:
    """What one adaptive request did: per wave, candidates and tokens; why it stopped."""

    candidates: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    reason: str = ""
    floor: float | None = None


class Adaptive:
    """Waves of candidates until the choice is settled; `selector` chooses the final one."""

    def __init__(self, settings: AdaptiveSettings, selector: SelectingStrategy) -> None:
        self.settings = settings
        self.selector = selector
        self.name = selector.name
        self.log = WaveLog()

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
        """Generate wave after wave (k: the most candidates; the waves are capped at it)."""
        s = self.settings.capped(k)
        control = control or GenerationControl()
        control.window = s.window
        control.min_confidence = s.floor
        self.log = WaveLog(floor=s.floor)
        prepared = self.selector.prepare(backend, settings)
        prepared = dataclasses.replace(prepared, logprobs=True, max_candidates=s.max_k)
        done: list[Candidate] = []

        def on_wave(ev: WaveEvent) -> None:
            self._after_wave(ev, done, s, control, on_event)

        def on_finish(c: Candidate) -> None:
            done.append(c)
            self.selector.on_finish(c)

        cands, early = run_candidates(
            backend,
            prompt_ids,
            s.waves[0],
            sampling,
            prepared,
            deadline=deadline,
            on_event=on_event,
            on_step=self.selector.on_step,
            on_finish=on_finish,
            on_wave=on_wave,
            control=control,
        )
        log = self.log
        if not log.candidates or log.candidates[-1] != len(cands):  # the last wave: no "end"
            log.candidates.append(len(cands))
            log.tokens.append(control.timings.generated_tokens - sum(log.tokens))
        if early:
            log.reason = "stopped at the latency budget with the best answer so far"
        elif not log.reason:
            stop, why = settled(done, s)
            log.reason = why if stop else f"reached max_k={s.max_k}: {why[5:]}"
        return cands, early

    def _after_wave(
        self,
        ev: WaveEvent,
        done: list[Candidate],
        s: AdaptiveSettings,
        control: GenerationControl,
        on_event: EventHook | None,
    ) -> None:
        """At a wave's end: stop when settled (or out of waves), else calibrate the floor after
        the first wave and ask for the next one."""
        if ev.phase != "end":
            return
        self.log.candidates.append(ev.candidates)
        self.log.tokens.append(control.timings.generated_tokens - sum(self.log.tokens))
        stop, why = settled(done, s)
        nxt = next((n for n in s.waves if n > ev.candidates), None)
        if stop or nxt is None:
            self.log.reason = why if stop else f"reached max_k={s.max_k}: {why[5:]}"
            if on_event is not None:
                on_event(WaveEvent(ev.wave, "stop", 0, ev.candidates, self.log.reason))
            return
        if control.min_confidence is None and s.calibrate_floor and ev.wave == 1:
            control.min_confidence = self.log.floor = first_wave_floor(done, s)
        control.extend(nxt - ev.candidates)

    def choose(self, backend: Backend, cands: list[Candidate], k: int, early: bool) -> SearchResult:
        """The selector's choice among every wave's candidates."""
        best, reason = self.selector.select(backend, cands, len(cands))
        log = self.log
        waves = ", ".join(str(n) for n in log.candidates)
        why = (
            f"{reason}; adaptive: {len(log.candidates)} wave(s) ({waves} candidates), {log.reason}"
        )
        return SearchResult(
            cands,
            position_of(cands, best),
            self.name,
            why,
            early,
            waves=[
                {"candidates": n, "tokens": t}
                for n, t in zip(log.candidates, log.tokens, strict=True)
            ],
            stop_reason=log.reason,
        )


def stopped_early(c: Candidate) -> str | None:
    """Why a candidate was stopped before its end, or None."""
    if c.finish_reason in (FinishReason.PRUNED, FinishReason.HALTED):
        return c.stop_note or c.finish_reason.value
    return None
