"""`Planner`: the scheduler's API for one opened model. It turns a request's options into the
scheduler's inputs (request shape, budgets, the KV types the runtime has), measures the machine once
(`calibration`), and returns the `Plan` (effort, k, KV layout and type, and why)."""

from __future__ import annotations

import dataclasses
import logging
import threading

from edge_metastone.backend import Backend
from edge_metastone.errors import InvalidRequestError
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
from edge_metastone.search.base import StrategyName
from edge_metastone.types import GenerationSettings, KVType, SamplingSettings

logger = logging.getLogger(__name__)

_NEEDS_HEAD = {StrategyName.BEST_OF_K, StrategyName.PRUNE, StrategyName.WEIGHTED_VOTE}


class Planner:
    """Plans requests for `backend`; `lock` is held while the calibration runs the model."""

    def __init__(
        self,
        backend: Backend,
        n_threads: int,
        sampling: SamplingSettings,
        calibration: Calibration | None,
        lock: threading.RLock,
    ) -> None:
        self.backend = backend
        self.n_threads = n_threads
        self.sampling = sampling
        self._calibration = calibration
        self._lock = lock

    def calibration(self, *, refresh: bool = False) -> Calibration:
        """This machine's calibration for the model (measured once, then cached on disk)."""
        with self._lock:  # it runs the engine: never beside a generation
            if self._calibration is None or refresh:
                from edge_metastone.calibration import calibration_for

                self._calibration = calibration_for(
                    self.backend, self.n_threads, self.sampling, refresh=refresh
                )
            return self._calibration

    def default_strategy(self) -> StrategyName:
        """The model file's measured best selector (`metastone.default_strategy`) when it names
        one this model can run; else best-of-k by SPRM score, or log-probability without a head."""
        named = self.backend.default_strategy
        has_head = self.backend.has_head
        try:
            choice = StrategyName(named) if named else None
        except ValueError:
            logger.warning("ignoring unknown default strategy %r in the model file", named)
            choice = None
        if choice is not None and (has_head or choice not in _NEEDS_HEAD):
            return choice
        return StrategyName.BEST_OF_K if has_head else StrategyName.LOGPROB

    def plan(self, prompt_tokens: int, o: ReasonOptions, max_new_tokens: int) -> Plan:
        """The scheduler's choice for a request of this size (no generation)."""
        req = Request(prompt_tokens, o.max_new_tokens or max_new_tokens)
        budget = Budget(
            o.latency_budget,
            int(o.memory_budget * MIB) if o.memory_budget is not None else None,
            o.allow_degrade,
        )
        kv_types = self.kv_types(o)
        facts = self.backend.facts
        if o.effort is not Effort.AUTO and budget.latency_s is None and budget.memory_bytes is None:
            cal = self._calibration
            pred = predict(facts, cal, req, o.effort.k, kv_type=kv_types[0]) if cal else None
            return Plan(o.effort, o.effort.k, pred, f"{o.effort.value} requested (k={o.effort.k})")
        efforts = [e for e in FIXED_EFFORTS if o.max_k is None or e.k <= o.max_k]
        if not efforts:
            raise InvalidRequestError(f"max_k={o.max_k} allows no effort mode (low needs k=2)")
        return choose(
            o.effort,
            facts,
            self.calibration(),
            req,
            budget,
            efforts=efforts,
            layouts=self.backend.kv_layouts,
            kv_types=kv_types,
        )

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


def planned_settings(settings: GenerationSettings, plan: Plan) -> GenerationSettings:
    """The generation settings with the KV layout and type the scheduler planned (and predicted)."""
    p = plan.prediction
    if p is None or p.k != plan.k:
        return settings
    return dataclasses.replace(settings, kv_layout=p.layout, kv_type=p.kv_type)
