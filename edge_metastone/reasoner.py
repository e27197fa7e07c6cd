"""`Reasoner`: the one Python API every front uses. Prompt in; chosen answer, candidates, step
scores, timings and the scheduler's reason out."""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_metastone.answers import extract_answer
from edge_metastone.backend import Backend, open_backend
from edge_metastone.errors import BudgetError, EdgeMetastoneError, InvalidRequestError
from edge_metastone.limits import MAX_THREADS, default_threads
from edge_metastone.models import default_model_path
from edge_metastone.scheduler import (
    FIXED_EFFORTS,
    MIB,
    Budget,
    Calibration,
    Effort,
    ModelFacts,
    Plan,
    Request,
    choose,
    predict,
)
from edge_metastone.search import StrategyName, make_strategy
from edge_metastone.types import (
    Candidate,
    Event,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    KVType,
    SamplingSettings,
)

logger = logging.getLogger(__name__)

# MetaStone-S1's recommended sampling (temperature 0.6, top-p 0.95).
DEFAULT_SAMPLING = SamplingSettings(temperature=0.6, top_p=0.95)
DEFAULT_MAX_NEW_TOKENS = 1024

Prompt = str | Sequence[Mapping[str, str]]


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
    stop: tuple[str, ...] = ()  # stop strings: a candidate ends before the first one it writes
    max_k: int | None = None  # the most candidates this request may run (auto picks within it)
    # the KV cache's element type (f16, q8_0, q4_0); None: F16, or q8_0 where the scheduler needs
    # it to fit a memory budget
    kv_cache: KVType | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "effort", Effort(self.effort))
            if self.strategy is not None:
                object.__setattr__(self, "strategy", StrategyName(self.strategy))
            if self.kv_cache is not None:
                object.__setattr__(self, "kv_cache", KVType(self.kv_cache))
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        for name, unit in (("latency_budget", "seconds"), ("memory_budget", "MB")):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InvalidRequestError(f"{name} must be a finite positive number ({unit})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidRequestError("seed must be an integer >= 0")
        if self.max_k is not None and (
            not isinstance(self.max_k, int) or isinstance(self.max_k, bool) or self.max_k < 1
        ):
            raise InvalidRequestError("max_k must be an integer >= 1")
        if self.max_k is not None and self.effort is not Effort.AUTO and self.effort.k > self.max_k:
            raise InvalidRequestError(
                f"effort {self.effort.value} generates k={self.effort.k} candidates, above "
                f"max_k={self.max_k}"
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        self.sampling(SamplingSettings())  # temperature and top_p checked now, not mid-request

    def sampling(self, base: SamplingSettings) -> SamplingSettings:
        """`base` with this request's seed, temperature and top_p."""
        changes: dict[str, Any] = {"seed": self.seed}
        if self.temperature is not None:
            changes["temperature"] = self.temperature
        if self.top_p is not None:
            changes["top_p"] = self.top_p
        for name in ("temperature", "top_p"):
            v = changes.get(name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise InvalidRequestError(f"{name} must be a finite number")
        return dataclasses.replace(base, **changes)


class _Cancelled(EdgeMetastoneError):
    """Raised inside a generation whose consumer stopped listening, or whose reasoner closed."""


def _options(options: ReasonOptions | None, fields: dict[str, Any]) -> ReasonOptions:
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

    @property
    def truncated(self) -> bool:
        """True when the candidate was cut before it ended its turn (as `Candidate.truncated`)."""
        return self.finish_reason not in (FinishReason.EOS.value, FinishReason.STOP.value)

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

    @property
    def chosen_candidate(self) -> CandidateView:
        """The candidate whose answer is returned."""
        return self.candidates[self.chosen]

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
                }
                for c in self.candidates
            ],
            "timings": self.timings,
            "strategy": self.strategy,
            "scheduler": {"reason": self.scheduler_reason, "predicted": self.predicted},
            "early_stop": self.early_stop,
        }


class Reasoner:
    """A reflective model opened for test-time scaling (default: the embedded model).

    The model runs on the backend its path calls for (a GGUF file on llama.cpp, an ONNX directory
    on onnxruntime), or on a `backend` already opened (e.g. a fake one in tests). `weight_buffers`
    (auto, extra, repack, plain; default $EDGE_METASTONE_WEIGHT_BUFFERS or auto) says where
    llama.cpp keeps a GGUF's weights (`edge_metastone.engine.weight_buffers`).
    """

    def __init__(
        self,
        model: Path | str | None = None,
        *,
        backend: Backend | None = None,
        head: Path | str | None = None,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        sampling: SamplingSettings = DEFAULT_SAMPLING,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        calibration: Calibration | None = None,
        weight_buffers: str | None = None,
    ) -> None:
        if not 0 <= n_threads <= MAX_THREADS:
            raise InvalidRequestError(f"threads must be between 0 (automatic) and {MAX_THREADS}")
        self.n_threads = n_threads or default_threads()
        if backend is not None:
            if model is not None or head is not None:
                raise InvalidRequestError("pass either a model path or an opened backend")
            self.backend = backend
        else:
            path = Path(model) if model is not None else default_model_path()
            self.backend = open_backend(
                path,
                head=head,
                n_threads=self.n_threads,
                n_gpu_layers=n_gpu_layers,
                weight_buffers=weight_buffers,
            )
        self.model_path = self.backend.path
        self.facts: ModelFacts = self.backend.facts
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self._calibration = calibration
        self._lock = threading.RLock()  # one generation (or calibration) at a time per model
        self._closing = threading.Event()

    @property
    def has_head(self) -> bool:
        """True when the model scores steps."""
        return self.backend.has_head

    @property
    def default_strategy(self) -> StrategyName:
        """The model file's measured best selector (`metastone.default_strategy`) when it names
        one this model can run; else best-of-k by SPRM score, or log-probability without a head."""
        named = self.backend.default_strategy
        needs_head = {StrategyName.BEST_OF_K, StrategyName.PRUNE, StrategyName.WEIGHTED_VOTE}
        try:
            choice = StrategyName(named) if named else None
        except ValueError:
            logger.warning("ignoring unknown default strategy %r in the model file", named)
            choice = None
        if choice is not None and (self.has_head or choice not in needs_head):
            return choice
        return StrategyName.BEST_OF_K if self.has_head else StrategyName.LOGPROB

    def calibration(self, *, refresh: bool = False) -> Calibration:
        """This machine's calibration for the model (measured once, then cached on disk)."""
        with self._lock:  # it runs the engine: never beside a generation
            if self._calibration is None or refresh:
                from edge_metastone.calibration import calibration_for

                self._check_open()
                self._calibration = calibration_for(
                    self.backend, self.n_threads, self.sampling, refresh=refresh
                )
            return self._calibration

    def prompt_text(self, prompt: Prompt) -> str:
        """The exact text fed to the model: the chat template applied to the prompt."""
        with self._lock:
            self._check_open()
            return self.encode(prompt)[0]

    def encode(self, prompt: Prompt, *, raw: bool = False) -> tuple[str, list[int]]:
        """(prompt text, token ids). Messages' text never becomes control tokens; with `raw`, a
        string prompt is fed as it is, its control-token markup parsed (a pre-rendered prompt)."""
        if raw:
            if not isinstance(prompt, str):
                raise InvalidRequestError("a raw prompt is one pre-rendered string")
            return prompt, self.backend.tokenize(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.backend.encode_chat(messages)

    def plan(self, prompt_tokens: int, options: ReasonOptions | None = None, **fields: Any) -> Plan:
        """The scheduler's choice for a request of this size (no generation)."""
        o = _options(options, fields)
        req = Request(prompt_tokens, o.max_new_tokens or self.max_new_tokens)
        budget = Budget(
            o.latency_budget,
            int(o.memory_budget * MIB) if o.memory_budget is not None else None,
            o.allow_degrade,
        )
        kv_types = self._kv_types(o)
        if o.effort is not Effort.AUTO and budget.latency_s is None and budget.memory_bytes is None:
            cal = self._calibration
            pred = predict(self.facts, cal, req, o.effort.k, kv_type=kv_types[0]) if cal else None
            return Plan(o.effort, o.effort.k, pred, f"{o.effort.value} requested (k={o.effort.k})")
        efforts = [e for e in FIXED_EFFORTS if o.max_k is None or e.k <= o.max_k]
        if not efforts:
            raise InvalidRequestError(f"max_k={o.max_k} allows no effort mode (low needs k=2)")
        return choose(
            o.effort,
            self.facts,
            self.calibration(),
            req,
            budget,
            efforts=efforts,
            layouts=self.backend.kv_layouts,
            kv_types=kv_types,
        )

    def _kv_types(self, o: ReasonOptions) -> tuple[KVType, ...]:
        """The KV types the scheduler may plan with: the request's, else the backend's."""
        if o.kv_cache is None:
            return tuple(self.backend.kv_types)
        if o.kv_cache not in self.backend.kv_types:
            raise InvalidRequestError(
                f"this model's runtime has no {o.kv_cache.value} KV cache "
                f"(it has {', '.join(t.value for t in self.backend.kv_types)})"
            )
        return (o.kv_cache,)

    def reason_stream(
        self, prompt: Prompt, options: ReasonOptions | None = None, **fields: Any
    ) -> Iterator[Event | ReasonResult]:
        """Yield the engine's events as they happen, then the final `ReasonResult`."""
        o = _options(options, fields)
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        cancelled = threading.Event()

        def forward(ev: Event) -> None:
            if cancelled.is_set():  # the consumer went away: unwind the generation
                raise _Cancelled
            q.put(("event", ev))

        def work() -> None:
            try:
                q.put(("result", self.reason(prompt, o, on_event=forward)))
            except _Cancelled:
                pass
            except BaseException as e:  # re-raised in the caller's thread
                q.put(("error", e))

        threading.Thread(target=work, daemon=True, name="edge-metastone-reason").start()
        try:
            while True:
                kind, item = q.get()
                if kind == "error":
                    raise item
                yield item
                if kind == "result":
                    return
        finally:
            cancelled.set()

    def reason(
        self,
        prompt: Prompt,
        options: ReasonOptions | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        **fields: Any,
    ) -> ReasonResult:
        """Generate k candidates (k from the effort, or chosen within the budgets) and pick one.

        Settings come as a `ReasonOptions` or as its fields: `effort`, `latency_budget` (seconds),
        `memory_budget` (MB), `seed`, `strategy`, `max_new_tokens`, `allow_degrade`, `logprobs`,
        `raw`, `temperature`, `top_p`, `stop`, `max_k`, `kv_cache`.
        """
        o = _options(options, fields)
        t0 = time.perf_counter()
        arrival = time.monotonic()
        max_new = o.max_new_tokens or self.max_new_tokens
        name = o.strategy or self.default_strategy
        strategy = make_strategy(name)
        sampling = o.sampling(self.sampling)
        settings = GenerationSettings(
            max_new_tokens=max_new,
            stop=o.stop,
            logprobs=o.logprobs,
            kv_type=o.kv_cache or KVType.F16,
        )
        deadline = arrival + o.latency_budget if o.latency_budget else None
        hook = self._hook(on_event)
        with self._lock:  # requests queue here; the latency budget counts from arrival
            self._check_open()
            t_wait = time.perf_counter() - t0
            text, ids = self.encode(prompt, raw=o.raw)
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and left <= 0:
                raise BudgetError(
                    f"the latency budget ({o.latency_budget} s) ran out while waiting for the model"
                )
            t1 = time.perf_counter()
            plan = self.plan(
                len(ids), dataclasses.replace(o, max_new_tokens=max_new, latency_budget=left)
            )
            t_plan = time.perf_counter() - t1
            settings = _with_kv(settings, plan)
            control = GenerationControl()  # this request's own handle (and timings)
            cands, early = strategy.run(
                self.backend,
                ids,
                plan.k,
                sampling,
                settings,
                deadline=deadline,
                on_event=hook,
                control=control,
            )
        tm = control.timings.as_dict()
        res = strategy.choose(self.backend, cands, plan.k, early)  # answer checks: off the lock
        tm["queue_s"] = t_wait
        tm["plan_s"] = t_plan
        tm["total_s"] = time.perf_counter() - t0
        views = [CandidateView.of(c) for c in res.candidates]
        pred = plan.prediction
        early = " - stopped early at the latency budget" if res.early_stop else ""
        return ReasonResult(
            answer=views[res.chosen].answer,
            effort=plan.effort.value if plan.effort else "single",
            k=plan.k,
            chosen=res.chosen,
            prompt_text=text,
            candidates=views,
            strategy=res.strategy.value,
            scheduler_reason=plan.reason + early,
            early_stop=res.early_stop,
            timings=tm,
            predicted={"latency_s": pred.latency_s, "memory_mb": pred.memory_bytes / MIB}
            if pred
            else {},
        )

    def _hook(self, on_event: Callable[[Event], None] | None) -> Callable[[Event], None]:
        def hook(ev: Event) -> None:
            if self._closing.is_set():  # close() was called: unwind the generation now
                raise _Cancelled("the reasoner was closed during the request")
            if on_event is not None:
                on_event(ev)

        return hook

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise EdgeMetastoneError("the reasoner is closed")

    def close(self) -> None:
        """Cancel any running generation, wait for it to unwind, then free the model."""
        self._closing.set()
        with self._lock:
            self.backend.close()

    def __enter__(self) -> Reasoner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_kv(settings: GenerationSettings, plan: Plan) -> GenerationSettings:
    """The generation settings with the KV layout and type the scheduler planned (and predicted)."""
    p = plan.prediction
    if p is None or p.k != plan.k:
        return settings
    return dataclasses.replace(settings, kv_layout=p.layout, kv_type=p.kv_type)
