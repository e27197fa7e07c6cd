"""`Reasoner`: the one Python API every front uses. Prompt in; chosen answer, candidates, step
scores, timings and the scheduler's reason out.

A façade over four parts: the planner (`planner.Planner`, the scheduler's API), the request queue
and lock (`gate.RequestGate`), the stream bridge (`bridge.stream`), and the options and result
types (`options`). The path of one request: front -> `Reasoner.reason` -> `Planner.plan` -> a search
strategy -> `Backend.generate` -> the decode loop -> the runtime's steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edge_metastone import cpu
from edge_metastone.answers import counting_fallbacks
from edge_metastone.backend import Backend
from edge_metastone.bridge import stream
from edge_metastone.calibration import ProgressHook
from edge_metastone.chat import PromptFormat
from edge_metastone.errors import BudgetError, InvalidRequestError
from edge_metastone.gate import RequestGate
from edge_metastone.limits import MAX_THREADS, default_threads
from edge_metastone.model_records import ModelRecords, prompt_warnings
from edge_metastone.modelfile.about import ModelAbout
from edge_metastone.models import default_model_path
from edge_metastone.options import (
    DEFAULT_SAMPLING,
    CandidateView,
    Prompt,
    ReasonOptions,
    ReasonResult,
    latency_deadline,
    options_of,
)
from edge_metastone.planner import HeldCalibration, Planner, adaptive_settings, planned_settings
from edge_metastone.runtime import open_backend
from edge_metastone.scheduler import MIB, Calibration, Effort, Plan
from edge_metastone.search import make_strategy
from edge_metastone.search.adaptive import Adaptive
from edge_metastone.search.base import SearchResult, StrategyName
from edge_metastone.types import (
    Event,
    GenerationControl,
    GenerationSettings,
    ModelFacts,
    SamplingSettings,
)


class Reasoner:
    """A reflective model opened for test-time scaling (default: the embedded model).

    The model runs on the backend its path calls for (a GGUF file on llama.cpp, an ONNX directory
    on onnxruntime), or on a `backend` already opened (e.g. a fake one in tests). `weight_buffers`
    (`WeightBuffers`) says where llama.cpp keeps a GGUF's weights.
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
        max_new_tokens: int | None = None,
        calibration: Calibration | None = None,
        weight_buffers: str | None = None,
        on_calibration: ProgressHook | None = None,
    ) -> None:
        if not 0 <= n_threads <= MAX_THREADS:
            raise InvalidRequestError(f"threads must be between 0 (automatic) and {MAX_THREADS}")
        if max_new_tokens:  # checked before the model loads (None or 0: the model's own)
            GenerationSettings(max_new_tokens=max_new_tokens)
        self.n_threads = n_threads or default_threads()
        if backend is not None and (model is not None or head is not None):
            raise InvalidRequestError("pass either a model path or an opened backend")
        self.backend = backend or _open(model, head, self.n_threads, n_gpu_layers, weight_buffers)
        self.model_path = self.backend.path
        self.prompt_format: PromptFormat = self.backend.prompt_format  # how chat is written
        self.head_path = Path(head) if head is not None else None  # as given (None: the file's)
        self.facts: ModelFacts = self.backend.facts
        # the model's recorded policy and provenance, parsed once (`model_records`)
        self.records = ModelRecords.read(self.backend, self.head_path)
        self.about: ModelAbout = self.records.about  # its name, task and measured head quality
        self.sampling = sampling
        # None: the model's own (its task's answer length, e.g. 160 for MetaStone-nano), else 1024
        self.max_new_tokens = max_new_tokens or self.about.max_new_tokens
        self._gate = RequestGate()  # requests share the model; the calibration has it alone
        self._calibration = HeldCalibration(
            self.backend,
            self.n_threads,
            sampling,
            calibration,
            self._gate.exclusive,
            on_calibration,
        )
        self._planner = Planner(self.backend, self.records, self._calibration)

    @property
    def has_head(self) -> bool:
        """True when the model scores steps."""
        return self.backend.has_head

    @property
    def default_strategy(self) -> StrategyName:
        """The selector a request without one gets (`ModelRecords.default_strategy`)."""
        return self.records.default_strategy

    def prompt_warnings(self, prompt: Prompt, *, raw: bool = False) -> tuple[str, ...]:
        """What a person should know before trusting an answer to `prompt` (the result's
        `warnings`; `model_records.prompt_warnings`)."""
        return prompt_warnings(self.about, self.prompt_format, prompt, raw=raw)

    def calibration(self, *, refresh: bool = False) -> Calibration:
        """This machine's calibration for the model (measured once, then cached on disk)."""
        self._gate.check_open()
        return self._calibration.calibration(refresh=refresh)

    def prompt_text(self, prompt: Prompt) -> str:
        """The exact text fed to the model: the chat template applied to the prompt."""
        with self._gate.shared():
            self._gate.check_open()
            return self.encode(prompt)[0]

    def encode(self, prompt: Prompt, *, raw: bool = False) -> tuple[str, list[int]]:
        """(prompt text, token ids). Messages' text never becomes control tokens; with `raw`, a
        string prompt is fed as it is, its control-token markup parsed (a pre-rendered prompt)."""
        return encode(self.backend, prompt, raw=raw)

    def plan(self, prompt_tokens: int, options: ReasonOptions | None = None, **fields: Any) -> Plan:
        """The scheduler's choice for a request of this size (no generation)."""
        o = options_of(options, fields)
        return self._planner.plan(prompt_tokens, o, self.max_new_tokens)

    def reason_stream(
        self, prompt: Prompt, options: ReasonOptions | None = None, **fields: Any
    ) -> Iterator[Event | ReasonResult]:
        """Yield the engine's events as they happen, then the final `ReasonResult`."""
        o = options_of(options, fields)
        return stream(lambda on_event: self.reason(prompt, o, on_event=on_event))

    def reason(
        self,
        prompt: Prompt,
        options: ReasonOptions | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        deadline: float | None = None,
        arrival: float | None = None,
        **fields: Any,
    ) -> ReasonResult:
        """Generate k candidates (k from the effort, or chosen within the budgets) and pick one.

        Settings come as a `ReasonOptions` or as its fields (`effort`, `latency_budget`, ...).
        `deadline` (time.monotonic()) is a hard stop the planner does not see (a server's cap):
        the search halts there as at a latency budget and chooses among the candidates so far.
        `arrival` (time.monotonic()): when the request arrived, where its latency budget starts.
        """
        o = options_of(options, fields)
        return _reason(self, prompt, o, on_event, deadline, arrival)

    def reason_many(
        self, prompts: Sequence[Prompt], options: ReasonOptions | None = None, **fields: Any
    ) -> list[ReasonResult]:
        """`reason` on every prompt, `window` (a field, default 8) of them at once: their
        candidates decode as one batch. The results in the prompts' order."""
        window = fields.pop("window", 8)
        return _reason_many(self, prompts, options_of(options, fields), window)

    def close(self) -> None:
        """Cancel the running generations, wait for them to unwind, then free the model."""
        self._gate.close(self.backend.close)

    def __enter__(self) -> Reasoner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(
    r: Reasoner,
    prompt: Prompt,
    o: ReasonOptions,
    on_event: Callable[[Event], None] | None,
    deadline: float | None,
    arrival: float | None,
) -> ReasonResult:
    """`Reasoner.reason`: one request's path, from its prompt to its chosen answer."""
    t0 = time.perf_counter()
    run = _Run(o, r.max_new_tokens, time.monotonic() if arrival is None else arrival, deadline)
    strategy = make_strategy(o.strategy or r.default_strategy, r.records.selector)
    r._gate.check_open()
    with r._gate.shared():  # waits only while a calibration has the model alone
        run.timings["queue_s"] = time.perf_counter() - t0
        r._gate.check_open()
        with cpu.heavy:  # between the shared context's decodes, not beside them
            text, ids = r.encode(prompt, raw=o.raw)
    warnings = r.prompt_warnings(prompt, raw=o.raw)
    # a calibration to measure has the model alone: outside the shared hold
    plan = run.plan(r._planner, len(ids), r.max_new_tokens)
    o = planned_think(o, plan)  # the thinking budget it runs: its own, or auto's choice
    with r._gate.shared():  # beside the other requests: the runtime batches them
        r._gate.check_open()
        strategy, control, cands, early = _search(r, o, run, plan, strategy, ids, on_event)
    with counting_fallbacks() as fallbacks, cpu.heavy:  # off the gate, between decodes
        res = strategy.choose(r.backend, cands, plan.k, early)
    run.timings["total_s"] = time.perf_counter() - t0
    out = _result(res, plan, text, run, control, o.think_budget)
    return dataclasses.replace(out, answer_check_fallbacks=fallbacks.n, warnings=warnings)


def encode(backend: Backend, prompt: Prompt, *, raw: bool = False) -> tuple[str, list[int]]:
    """`Reasoner.encode`: a raw string as it is, else the chat's messages (a string: one user
    message) by the model's template."""
    if raw:
        if not isinstance(prompt, str):
            raise InvalidRequestError("a raw prompt is one pre-rendered string")
        return prompt, backend.tokenize_prompt(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return backend.encode_chat(messages)


def _search(
    r: Reasoner,
    o: ReasonOptions,
    run: _Run,
    plan: Plan,
    strategy: Any,
    ids: list[int],
    on_event: Callable[[Event], None] | None,
) -> tuple[Any, GenerationControl, list, bool]:
    """Run the planned search (inside a shared hold of the gate): the strategy (adaptive's when
    the plan says so), the request's own control, its candidates and whether it stopped early."""
    if plan.effort is Effort.ADAPTIVE:
        adaptive = adaptive_settings(r.records, o)
        strategy = Adaptive(adaptive, make_strategy(adaptive.selector, r.records.selector))
    control = GenerationControl()  # this request's own handle (and timings)
    control.aborted = lambda: r._gate.closing
    cands, early = strategy.run(
        r.backend,
        ids,
        plan.k,
        o.sampling(r.sampling),
        think_settings(r.backend, o, planned_settings(run.settings, plan)),
        deadline=run.stop_at,
        on_event=r._gate.hook(on_event),
        control=control,
    )
    r._calibration.observe(plan, control.timings)  # a wrong calibration gets re-checked
    return strategy, control, cands, early


def planned_think(o: ReasonOptions, plan: Plan) -> ReasonOptions:
    """The request's options with the thinking budget auto chose with k, where it chose one."""
    if plan.think_budget is None or o.think_budget is not None:
        return o
    return dataclasses.replace(o, think_budget=plan.think_budget)


def think_settings(backend: Backend, o: ReasonOptions, settings: GenerationSettings) -> Any:
    """`settings` with the request's thinking budget and the tokens that end a thought for it
    (its message's, as plain text); refused for a model without think markup."""
    if o.think_budget is None:
        return settings
    if not backend.rule.thinks:
        raise InvalidRequestError(
            "a thinking budget needs a model that thinks inside <think> ... </think> tokens; "
            "this one has no such tokens",
            param="think_budget",
        )
    msg = o.think_budget_message
    close = tuple(backend.tokenize_text(msg)) if msg else ()
    return dataclasses.replace(settings, think_budget=o.think_budget, think_close=close)


def _reason_many(
    r: Reasoner, prompts: Sequence[Prompt], o: ReasonOptions, window: int
) -> list[ReasonResult]:
    """`Reasoner.reason_many`: a pool of `window` threads, each calling `reason`."""
    if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= 256:
        raise InvalidRequestError("window must be an integer from 1 to 256", param="window")
    with ThreadPoolExecutor(window, "edge-metastone-many") as pool:
        return list(pool.map(lambda p: r.reason(p, o), prompts))


def _open(
    model: Path | str | None,
    head: Path | str | None,
    n_threads: int,
    n_gpu_layers: int,
    weight_buffers: str | None,
) -> Backend:
    """The model at `model` (default: the embedded one) on the runtime it needs."""
    path = Path(model) if model is not None else default_model_path()
    return open_backend(
        path,
        head=head,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        weight_buffers=weight_buffers,
    )


class _Run:
    """One request's derived settings: its generation settings and deadline."""

    def __init__(
        self, o: ReasonOptions, default_max_new: int, arrival: float, hard: float | None
    ) -> None:
        self.options = o
        self.settings = o.generation(default_max_new)
        self.deadline = latency_deadline(o, arrival)
        self.by_budget = hard is None or (self.deadline is not None and self.deadline <= hard)
        self.stop_at = self.deadline if self.by_budget else hard  # where the search halts
        self.timings: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}  # HeldCalibration.prepare's note for the result

    def plan(self, planner: Planner, prompt_tokens: int, default_max_new: int) -> Plan:
        """Plan with what is left of the latency budget after waiting in the queue. The
        calibration is made ready first, its time left out of the request's limits (the result's
        `calibration` note says so)."""
        left = self.deadline - time.monotonic() if self.deadline is not None else None
        if left is not None and left <= 0:
            raise BudgetError(
                f"the latency budget ({self.options.latency_budget} s) ran out while waiting for "
                "the model"
            )
        t1 = time.monotonic()
        self.calibration = planner.held.prepare(prompt_tokens, self.options)
        self.timings["calibration_s"] = spent = time.monotonic() - t1
        if self.stop_at is not None:
            self.stop_at += spent
        if self.deadline is not None:  # `left` stays what it was before the calibration
            self.deadline += spent
        t1 = time.perf_counter()
        o = dataclasses.replace(self.options, latency_budget=left)
        plan = planner.plan(prompt_tokens, o, default_max_new)
        self.timings["plan_s"] = time.perf_counter() - t1
        return plan


def _result(
    res: SearchResult,
    plan: Plan,
    text: str,
    run: _Run,
    control: GenerationControl,
    think_budget: int | None,
) -> ReasonResult:
    """The search's outcome as the user sees it (`run`: where it stopped early, the calibration
    note, its own timings beside the generation's in `control`; `think_budget`: the one its
    candidates ran under)."""
    tm = {**control.timings.as_dict(), **run.timings}
    tm["queue_s"] = run.timings["queue_s"] + control.timings.queue_s  # the gate, the context
    views = [CandidateView.of(c) for c in res.candidates]
    pred = plan.prediction
    by = "the latency budget" if run.by_budget else "the request's time limit"
    early = f" - stopped early at {by}" if res.early_stop else ""
    return ReasonResult(
        answer=views[res.chosen].answer,
        effort=plan.effort.value if plan.effort else "single",
        k=len(res.candidates) if res.waves else plan.k,  # adaptive: the candidates it ran
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
        calibration=run.calibration,
        waves=list(res.waves),
        stop_reason=res.stop_reason,
        think_budget=think_budget,
        stopped_by=("latency_budget" if run.by_budget else "time_limit") if res.early_stop else "",
    )
