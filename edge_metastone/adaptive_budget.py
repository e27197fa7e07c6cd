"""Adaptive compute under the scheduler: its predicted cost from the model's recorded settings and
the calibration, and when `auto` runs it.

Memory: the context holds max_k candidates and the kept prompt (`LlamaSlots`), as high effort's
plus one stream. Latency: the expected cost, each wave's worst case (its candidates run to
max_new_tokens) weighted by the share of validation problems that ran it
(`metastone.adaptive`'s `measured.reach`; every wave when it was not measured). A latency budget
still stops it anytime, with the best answer so far.
"""

from __future__ import annotations

import dataclasses

from edge_metastone.kvpolicy import resolve_layout
from edge_metastone.scheduler import (
    Budget,
    Calibration,
    Effort,
    Plan,
    Prediction,
    Request,
    fits,
    predict,
)
from edge_metastone.search.adaptive import AdaptiveSettings
from edge_metastone.types import KVLayout, KVType, ModelFacts

MATCHES_HIGH = 0.005  # recorded accuracy within this of high effort's: auto prefers adaptive


def reach(s: AdaptiveSettings) -> list[float]:
    """The share of requests expected to run each wave (1.0 each when not measured)."""
    measured = s.measured.get("reach") if isinstance(s.measured, dict) else None
    ok = isinstance(measured, list) and len(measured) == len(s.waves)
    if ok and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in measured):
        return [float(v) for v in measured]
    return [1.0] * len(s.waves)


def predict_adaptive(
    facts: ModelFacts,
    cal: Calibration,
    req: Request,
    s: AdaptiveSettings,
    kv_type: KVType = KVType.F16,
) -> Prediction:
    """Expected latency and peak memory of adaptive compute with settings `s`."""
    layout = resolve_layout(KVLayout.AUTO, s.max_k, req.prompt_tokens, req.max_new_tokens)
    whole = predict(facts, cal, req, s.max_k + 1, layout, kv_type)
    sizes = [b - a for a, b in zip((0, *s.waves[:-1]), s.waves, strict=True)]
    latency = sum(
        share * predict(facts, cal, req, n, layout, kv_type).latency_s
        for share, n in zip(reach(s), sizes, strict=True)
    )
    return Prediction(s.max_k, latency, whole.memory_bytes, layout, kv_type)


def matches_high(s: AdaptiveSettings) -> bool:
    """The model's validation measured adaptive as accurate as high effort."""
    m = s.measured if isinstance(s.measured, dict) else {}
    acc, high = m.get("accuracy"), m.get("high_accuracy")
    numbers = all(isinstance(v, (int, float)) for v in (acc, high))
    return numbers and acc >= high - MATCHES_HIGH  # type: ignore[operator]


def plan_adaptive(
    requested: Effort,
    fixed: Plan | None,
    facts: ModelFacts,
    cal: Calibration | None,
    req: Request,
    budget: Budget,
    s: AdaptiveSettings,
    kv_type: KVType = KVType.F16,
) -> Plan | None:
    """The adaptive plan when `requested` is adaptive (it always runs: a latency budget stops it
    anytime), or when auto's choice `fixed` is high (or less) and the model's recorded adaptive
    settings match high's accuracy and fit the budgets; None otherwise."""
    pred = predict_adaptive(facts, cal, req, s, kv_type) if cal is not None else None
    waves = "/".join(str(n) for n in s.waves)
    if requested is Effort.ADAPTIVE:
        if pred is None:
            return Plan(Effort.ADAPTIVE, s.max_k, None, f"adaptive requested (waves {waves})")
        over = (
            "" if fits(pred, budget) else "; over the budget it stops anytime with the best so far"
        )
        why = f"adaptive requested (waves {waves}); expected {pred.latency_s:.2f} s{over}"
        return Plan(Effort.ADAPTIVE, s.max_k, pred, why, fixed.predictions if fixed else ())
    if requested is not Effort.AUTO or fixed is None or fixed.effort is None or pred is None:
        return None
    if not matches_high(s) or not fits(pred, budget):
        return None
    if fixed.effort is Effort.HIGH or fixed.k < s.max_k:
        why = (
            f"auto chose adaptive (waves {waves}; measured as accurate as high on the model's "
            f"validation): expected {pred.latency_s:.2f} s, {pred.memory_bytes / 2**20:.0f} MiB, "
            f"instead of {fixed.effort.value}"
        )
        return dataclasses.replace(
            fixed,
            effort=Effort.ADAPTIVE,
            k=s.max_k,
            prediction=pred,
            reason=why,
            think_budget=None,
        )
    return None
