"""A reasoning request's options and its result: `ReasonOptions` in (checked when made, the one
place a request's settings are validated; the fronts map their input onto it), `ReasonResult` out,
each candidate a `CandidateView`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_metastone.answers import extract_answer
from edge_metastone.errors import InvalidRequestError
from edge_metastone.scheduler import Effort
from edge_metastone.search.adaptive import stopped_early
from edge_metastone.search.base import StrategyName
from edge_metastone.types import (
    Candidate,
    FinishReason,
    GenerationSettings,
    KVType,
    SamplingSettings,
    finite_number,
)

# MetaStone-S1's recommended sampling (temperature 0.6, top-p 0.95).
DEFAULT_SAMPLING = SamplingSettings(temperature=0.6, top_p=0.95)
DEFAULT_MAX_NEW_TOKENS = 1024

Prompt = str | Sequence[Mapping[str, str]]
MAX_K = 256  # llama.cpp's most sequences in one context
MAX_THINK_MESSAGE = 512  # characters of the text written before a budget's `</think>`
MAX_MEMORY_MB = float(2**43)  # a memory budget in bytes must fit a 64-bit count


@dataclass(frozen=True)
class ReasonOptions:
    """One request's settings; the `reason` command's flags map 1:1 to these fields."""

    effort: Effort = Effort.MEDIUM  # auto: the scheduler picks the highest effort within budgets
    latency_budget: float | None = None  # seconds
    memory_budget: float | None = None  # MB
    seed: int = 0
    strategy: StrategyName | None = None
    max_new_tokens: int | None = None
    allow_degrade: bool = False
    logprobs: bool = False  # every candidate's mean log-probability (evaluation; costs a softmax)
    raw: bool = False  # the prompt is pre-rendered text: fed as is, control tokens parsed
    temperature: float | None = None  # None: the reasoner's sampling (MetaStone's 0.6)
    top_p: float | None = None  # None: the reasoner's sampling (0.95)
    top_k: int | None = None  # None: the reasoner's sampling (0: off)
    min_p: float | None = None  # None: the reasoner's sampling (0: off)
    stop: tuple[str, ...] = ()  # stop strings: a candidate ends before the first one it writes
    max_k: int | None = None  # the most candidates this request may run (auto picks within it)
    k: int | None = None  # an explicit number of candidates (None: the effort's preset)
    # tokens each candidate may think (inside its think markup) before its thought is ended for
    # it, after `think_budget_message` (llama-server's --reasoning-budget and its message)
    think_budget: int | None = None
    think_budget_message: str = ""
    # the KV cache's element type (f16, q8_0, q4_0); None: F16, or q8_0 where the scheduler needs
    # it to fit a memory budget
    kv_cache: KVType | None = None
    # reuse an earlier prompt's cells where this one starts the same way (the next turn of a
    # chat, a shared few-shot prefix); the result's timings say how many (cached_prompt_tokens)
    cache_prompt: bool = False

    def __post_init__(self) -> None:
        for name, kind in (("effort", Effort), ("strategy", StrategyName), ("kv_cache", KVType)):
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError as e:
                    raise InvalidRequestError(str(e), param=name) from None
        for name, unit, most in (
            ("latency_budget", "seconds", math.inf),
            ("memory_budget", "MB", MAX_MEMORY_MB),
        ):
            v = getattr(self, name)
            if v is not None and not (finite_number(v) and 0 < v <= most):
                limit = f", at most {most:g}" if math.isfinite(most) else ""
                raise InvalidRequestError(
                    f"{name} must be a finite positive number ({unit}{limit})", param=name
                )
        self._check_max_k()
        b, msg = self.think_budget, self.think_budget_message
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 0):
            raise InvalidRequestError("think_budget must be an integer >= 0", param="think_budget")
        if not isinstance(msg, str) or len(msg) > MAX_THINK_MESSAGE:
            raise InvalidRequestError(
                f"think_budget_message must be text of at most {MAX_THINK_MESSAGE} characters",
                param="think_budget_message",
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        # the sampling and generation settings check their own fields, now rather than mid-request
        self.sampling(SamplingSettings())
        self.generation(1)

    def _check_max_k(self) -> None:
        if self.k is not None:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= MAX_K:
                raise InvalidRequestError(f"k must be an integer in 1..{MAX_K}", param="k")
            if self.effort.mode.k is None:
                raise InvalidRequestError(
                    f"k sets the candidates itself: it does not go with effort {self.effort.value}",
                    param="k",
                )
            if self.max_k is not None and self.k > self.max_k:
                raise InvalidRequestError(f"k={self.k} is above max_k={self.max_k}", param="k")
            return
        k = self.max_k
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise InvalidRequestError("max_k must be an integer >= 1", param="max_k")
        fixed = self.effort.mode.k  # None: auto and adaptive run within max_k
        if k is not None and fixed is not None and fixed > k:
            raise InvalidRequestError(
                f"effort {self.effort.value} generates k={self.effort.k} candidates, above "
                f"max_k={k}",
                param="effort",
            )

    def sampling(self, base: SamplingSettings) -> SamplingSettings:
        """`base` with this request's seed, temperature, top_p, top_k and min_p."""
        changes: dict[str, Any] = {"seed": self.seed}
        for name in ("temperature", "top_p", "top_k", "min_p"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        return dataclasses.replace(base, **changes)

    def generation(self, default_max_new_tokens: int) -> GenerationSettings:
        """The generation settings of this request (the KV layout the scheduler fills in)."""
        return GenerationSettings(
            max_new_tokens=default_max_new_tokens
            if self.max_new_tokens is None
            else self.max_new_tokens,
            stop=self.stop,
            logprobs=self.logprobs,
            kv_type=self.kv_cache or KVType.F16,
            cache_prompt=self.cache_prompt,
        )


def latency_deadline(o: ReasonOptions, arrival: float) -> float | None:
    """Where the request's latency budget ends (`time.monotonic()`): it counts from the
    request's arrival (`arrival`), so time spent queued is spent from it. None without one."""
    return arrival + o.latency_budget if o.latency_budget else None


def options_of(options: ReasonOptions | None, fields: dict[str, Any]) -> ReasonOptions:
    """The request's options: a `ReasonOptions`, or its fields as keywords (not both)."""
    if options is not None and fields:
        raise InvalidRequestError("pass either a ReasonOptions or its fields, not both")
    if options is not None:
        return options
    try:
        return ReasonOptions(**fields)
    except TypeError as e:
        raise InvalidRequestError(str(e)) from None


@dataclass(frozen=True)
class CandidateView:
    """One candidate as users see it."""

    index: int
    text: str
    token_ids: list[int]
    answer: str
    step_scores: list[float]
    score: float | None
    tokens: int
    finish_reason: str
    mean_logprob: float | None
    step_confidence: list[float | None] = field(default_factory=list)  # Candidate.step_confidence
    stopped_early: str | None = None  # why it was stopped before its end (pruned, halted)
    thought_ended: bool = False  # its thinking budget ran out: its `</think>` was written for it

    @property
    def truncated(self) -> bool:
        """True when the candidate was cut before it ended its turn (as `Candidate.truncated`)."""
        return FinishReason(self.finish_reason).cut

    @classmethod
    def of(cls, c: Candidate) -> CandidateView:
        """From the engine's candidate."""
        return cls(
            index=c.index,
            text=c.text,
            token_ids=list(c.token_ids),
            answer=extract_answer(c.text),
            step_scores=list(c.step_scores),
            score=c.score,
            tokens=c.n_tokens,
            finish_reason=c.finish_reason.value,
            mean_logprob=c.mean_logprob,
            step_confidence=list(c.step_confidence),
            stopped_early=stopped_early(c),
            thought_ended=c.thought_ended,
        )


@dataclass(frozen=True)
class ReasonResult:
    """What `Reasoner.reason` returns."""

    answer: str
    effort: str
    k: int
    chosen: int
    prompt_text: str
    candidates: list[CandidateView]
    strategy: str
    scheduler_reason: str
    early_stop: bool
    timings: dict[str, float | str] = field(default_factory=dict)  # + kv_layout, kv_type
    predicted: dict[str, float] = field(default_factory=dict)
    # where the calibration came from and what it cost (`HeldCalibration.prepare`; never in the budget)
    calibration: dict[str, Any] = field(default_factory=dict)
    waves: list[dict[str, int]] = field(default_factory=list)  # adaptive: candidates, tokens
    stop_reason: str = ""  # adaptive: why no further wave ran
    answer_check_fallbacks: int = 0  # answer checks that fell back to comparing text
    # the thinking budget each candidate ran under: the request's, or auto's choice; None: none
    think_budget: int | None = None
    # what a person should know before trusting the answer (`Reasoner.prompt_warnings`: a prompt
    # outside the model's known task, a fallback chat format); `reason --json`'s "warnings"
    warnings: tuple[str, ...] = ()
    # what stopped the search early: "latency_budget" (the request's own), "time_limit" (the
    # caller's hard deadline, e.g. a server's cap); "" when it was not stopped
    stopped_by: str = ""

    @property
    def chosen_candidate(self) -> CandidateView:
        """The candidate whose answer is returned."""
        return self.candidates[self.chosen]

    def reason_json(self) -> dict[str, Any]:
        """What `reason --json` prints (and the server's `metastone` field holds): `to_json()`
        and the result's `warnings`."""
        return {**self.to_json(), "warnings": list(self.warnings)}

    def to_json(self) -> dict[str, Any]:
        """The `reason --json` object of SPEC §3 (plus the scheduler's reason and strategy)."""
        return {
            "answer": self.answer,
            "effort": self.effort,
            "k": self.k,
            "chosen": self.chosen,
            "prompt_text": self.prompt_text,
            "candidates": [
                {
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "answer": c.answer,
                    "step_scores": c.step_scores,
                    "score": c.score if c.score is not None else 0.0,
                    "tokens": c.tokens,
                    "finish_reason": c.finish_reason,
                    "mean_logprob": c.mean_logprob,
                    "step_confidence": c.step_confidence,
                    "stopped_early": c.stopped_early,
                    "thought_ended": c.thought_ended,
                }
                for c in self.candidates
            ],
            "timings": self.timings,
            "strategy": self.strategy,
            "scheduler": {"reason": self.scheduler_reason, "predicted": self.predicted},
            "early_stop": self.early_stop,
            "calibration": self.calibration,
            "waves": self.waves,
            "stop_reason": self.stop_reason,
            "answer_check_fallbacks": self.answer_check_fallbacks,
            "think_budget": self.think_budget,
        }
