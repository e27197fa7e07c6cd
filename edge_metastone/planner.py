"""The scheduler's API for one opened model. `HeldCalibration` gets the machine's calibration
ready before a request's latency budget starts (`prepare`: measured once and checked, then cached;
re-checked after a run that disagreed with it, `observe`); `Planner` turns a request's options
into the scheduler's inputs (request shape, budgets, the KV types the runtime has) and returns the
`Plan` (effort, k, KV layout and type, and why)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from edge_metastone.adaptive_budget import plan_adaptive
from edge_metastone.backend import Backend
from edge_metastone.calibration import (
    CalibrationStatus,
    Meter,
    Outcome,
    ProgressHook,
    Shape,
    cached_calibration,
    calibration_for,
    mark_suspect,
    suspicion,
)
from edge_metastone.errors import InvalidRequestError
from edge_metastone.model_records import ModelRecords
from edge_metastone.options import ReasonOptions
from edge_metastone.scheduler import (
    FIXED_EFFORTS,
    MIB,
    Budget,
    Calibration,
    Effort,
    Plan,
    Request,
    choose,
    predict,
)
from edge_metastone.search.adaptive import AdaptiveSettings
from edge_metastone.thinking_scaling import plan_two_axis
from edge_metastone.types import GenerationSettings, KVType, SamplingSettings, Timings

logger = logging.getLogger(__name__)


class HeldCalibration:
    """The calibration requests for `backend` plan with (read from several requests' threads at
    once): measured once and checked, then cached on disk, re-checked after a run that disagreed
    with it. `exclusive()` holds the model alone while a calibration runs it. A calibration
    passed in is the caller's: used as it is, never re-checked. `progress` hears how a
    calibration goes; `meter` replaces its measurement (tests)."""

    def __init__(
        self,
        backend: Backend,
        n_threads: int,
        sampling: SamplingSettings,
        calibration: Calibration | None,
        exclusive: Callable[[], AbstractContextManager[None]],
        progress: ProgressHook | None = None,
    ) -> None:
        self.backend = backend
        self.n_threads = n_threads
        self.sampling = sampling
        self._calibration = calibration
        self._given = calibration is not None
        self._stored = False  # the calibration held is the one cached on disk
        self._exclusive = exclusive
        self._lock = threading.RLock()  # the held calibration (state only: never held to measure)
        self.progress = progress
        self.meter: Meter | None = None

    @property
    def current(self) -> Calibration | None:
        """The calibration held now, as it is (None: none yet)."""
        return self._calibration

    def calibration(self, *, refresh: bool = False) -> Calibration:
        """This machine's calibration for the model (measured once and checked, then cached on
        disk; re-checked first when a run disagreed with it)."""
        cal = self._calibration
        if cal is None or refresh or (cal.suspect and not self._given):
            self.measure(refresh=refresh)
        assert self._calibration is not None
        return self._calibration

    def measure(self, *, refresh: bool = False, shape: Shape | None = None) -> Outcome:
        """Load, re-check or measure the calibration (`calibration_for`), and hold it."""
        with self._exclusive(), self._lock:  # it runs the engine: never beside a generation
            out = calibration_for(
                self.backend,
                self.n_threads,
                self.sampling,
                refresh=refresh,
                shape=shape or Shape(),
                progress=self.progress,
                meter=self.meter,
            )
            self._calibration, self._given, self._stored = out.calibration, False, out.stored
            return out

    def prepare(self, prompt_tokens: int, o: ReasonOptions) -> dict[str, Any]:
        """Get the calibration this request plans with ready, before its latency budget counts:
        measured (first use), re-checked (a run disagreed with it), else cached or none. Returns
        the result's `calibration` note: where it came from, the seconds it took (not counted in
        the request's latency budget: `in_budget` false), and its checks."""
        cal = self._calibration
        if self._given:
            out = Outcome(cal, CalibrationStatus.GIVEN) if cal else None
        elif needs_calibration(o) and (cal is None or cal.suspect):
            auto_k = min(Effort.MEDIUM.k, o.max_k or Effort.MEDIUM.k)
            k = o.effort.mode.k or auto_k  # auto and adaptive: measured at medium's k
            out = self.measure(shape=Shape(prompt_tokens, k))
        elif cal is not None:
            out = Outcome(cal, CalibrationStatus.CACHED, stored=self._stored)
        else:  # a fixed effort: a cached calibration only describes the plan
            found = cached_calibration(self.backend, self.n_threads, self.sampling)
            with self._lock:
                self._calibration, self._stored = found, found is not None
            out = Outcome(found, CalibrationStatus.CACHED, stored=True) if found else None
        note = out.as_dict() if out else {"status": CalibrationStatus.NONE.value, "seconds": 0.0}
        return {**note, "in_budget": False}

    def observe(self, plan: Plan, timings: Timings) -> None:
        """After a run: when it took more than `RECHECK_RATIO` x (or under 1/x) the time per step
        the calibration predicts for its shape, mark the calibration for a re-check before its next
        use (the cached file too)."""
        if plan.effort is Effort.ADAPTIVE:  # its waves run fewer than plan.k at a time
            return
        if timings.shared_rounds:  # batched with other requests: its steps were not its own
            return
        with self._lock:
            cal = self._calibration
            if cal is None or self._given or cal.suspect:
                return
            why = suspicion(self.backend.facts, cal, timings, plan.k)
            if why:
                logger.warning("%s: the calibration is re-checked before its next use", why)
                self._calibration = mark_suspect(cal, why, cached=self._stored)


class Planner:
    """Plans requests for `backend` by its model's `records` with the calibration `held`."""

    def __init__(self, backend: Backend, records: ModelRecords, held: HeldCalibration) -> None:
        self.backend = backend
        self.records = records
        self.held = held

    def plan(self, prompt_tokens: int, o: ReasonOptions, max_new_tokens: int) -> Plan:
        """The scheduler's choice for a request of this size (no generation). A fixed effort under
        a latency budget runs (until the deadline when it is predicted over it)."""
        others = self.backend.busy_sequences  # the batch this request joins
        req = Request(prompt_tokens, o.max_new_tokens or max_new_tokens, others)
        budget = Budget(
            o.latency_budget,
            int(o.memory_budget * MIB) if o.memory_budget is not None else None,
            o.allow_degrade,
        )
        kv_types = self.kv_types(o)
        facts = self.backend.facts
        if o.effort is Effort.ADAPTIVE:
            cal = self.held.current  # its prediction is informative: never calibrate for it
            s = adaptive_settings(self.records, o)
            return plan_adaptive(o.effort, None, facts, cal, req, budget, s, kv_types[0])
        cal = self.held.calibration() if needs_calibration(o) else self.held.current
        if (
            o.k is not None
            or cal is None
            or (not needs_calibration(o) and budget.latency_s is None)
        ):
            k = o.k or o.effort.k
            pred = predict(facts, cal, req, k, kv_type=kv_types[0]) if cal else None
            why = f"k={k} requested" if o.k else f"{o.effort.value} requested (k={k})"
            if budget.latency_s is not None:
                why += f"; it runs until its {budget.latency_s:g} s deadline (no calibration)"
            return Plan(o.effort, k, pred, why)
        efforts = [e for e in FIXED_EFFORTS if o.max_k is None or e.k <= o.max_k]
        if not efforts:
            raise InvalidRequestError(f"max_k={o.max_k} allows no effort mode (low needs k=2)")
        plan = two_axis(self.backend, self.records, o, cal, req, budget, kv_types) or choose(
            o.effort,
            facts,
            cal,
            req,
            budget,
            efforts=efforts,
            layouts=self.backend.kv_layouts,
            kv_types=kv_types,
        )
        s = adaptive_settings(self.records, o)
        return plan_adaptive(o.effort, plan, facts, cal, req, budget, s, kv_types[0]) or plan

    def kv_types(self, o: ReasonOptions) -> tuple[KVType, ...]:
        """The KV types the scheduler may plan with: the request's, else the backend's."""
        have = tuple(self.backend.kv_types)
        if o.kv_cache is None:
            return have
        if o.kv_cache not in have:
            raise InvalidRequestError(
                f"this model's runtime has no {o.kv_cache.value} KV cache "
                f"(it has {', '.join(t.value for t in have)})"
            )
        return (o.kv_cache,)


def two_axis(
    backend: Backend,
    records: ModelRecords,
    o: ReasonOptions,
    cal: Calibration,
    req: Request,
    budget: Budget,
    kv_types: tuple[KVType, ...],
) -> Plan | None:
    """Auto under a latency budget, with the model's thinking-scaling table: k and a thinking
    budget together (`thinking_scaling.plan_two_axis`); None: the k-only choice decides (no
    table, no point fits, or the request set its own thinking budget)."""
    if o.effort is not Effort.AUTO or budget.latency_s is None or o.think_budget is not None:
        return None
    table = records.thinking_scaling
    if table is None:
        return None
    return plan_two_axis(
        table,
        backend.facts,
        cal,
        req,
        budget,
        max_k=o.max_k,
        thinks=backend.rule.thinks,
        layouts=backend.kv_layouts,
        kv_types=kv_types,
    )


def needs_calibration(o: ReasonOptions) -> bool:
    """Auto picks by predictions, and a memory budget needs the measured process size; a fixed
    effort under a latency budget alone runs until its deadline, predicted or not."""
    return o.effort.mode.chooses or o.memory_budget is not None


def planned_settings(settings: GenerationSettings, plan: Plan) -> GenerationSettings:
    """The generation settings with the KV layout and type the scheduler planned (and predicted)."""
    p = plan.prediction
    if p is None or p.k != plan.k:
        return settings
    return dataclasses.replace(settings, kv_layout=p.layout, kv_type=p.kv_type)


def adaptive_settings(records: ModelRecords, o: ReasonOptions) -> AdaptiveSettings:
    """The model's adaptive settings (`ModelRecords.adaptive`) within the request's max_k, with
    its selector when it names one."""
    s = records.adaptive
    if o.max_k is not None:
        s = s.capped(o.max_k)
    return dataclasses.replace(s, selector=o.strategy) if o.strategy else s
