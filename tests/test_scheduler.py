"""The budget scheduler on synthetic cost tables: exact decisions, budgets never exceeded."""

from __future__ import annotations

import itertools

import pytest

from edge_metastone import scheduler
from edge_metastone.errors import BudgetError, InvalidRequestError
from edge_metastone.scheduler import (
    MIB,
    Budget,
    Calibration,
    Effort,
    ModelFacts,
    Request,
    choose,
    predict,
)

FACTS = ModelFacts(
    weight_bytes=1000 * MIB,
    n_layers=28,
    n_kv_heads=2,
    head_dim=128,
    n_embd=1536,
    n_ff=8960,
    n_head=12,
    n_vocab=151936,
    n_ctx_train=131072,
    head_bytes=0,
)
CAL = Calibration(
    step_seconds={1: 0.05, 2: 0.055, 4: 0.06, 8: 0.08, 16: 0.14, 32: 0.26},
    prefill_tokens_per_s=400.0,
    base_rss_bytes=1200 * MIB,
    n_threads=2,
)
REQ = Request(prompt_tokens=100, max_new_tokens=1000)


def test_step_time_interpolates_log_linearly():
    assert CAL.step_time(1) == 0.05
    assert CAL.step_time(8) == 0.08
    assert CAL.step_time(32) == 0.26
    assert CAL.step_time(3) == pytest.approx(0.055 + (0.06 - 0.055) * 0.5849625, rel=1e-6)
    assert CAL.step_time(64) == pytest.approx(0.52)


def test_kv_bytes_exact():
    # 2 (K,V) * 28 layers * 2 kv heads * 128 dims * 2 bytes = 28672 bytes per cell, padded to 256
    assert FACTS.kv_bytes(1) == 28672 * 256
    assert FACTS.kv_bytes(257) == 28672 * 512


def test_prediction_exact():
    p = predict(FACTS, CAL, REQ, 8)
    assert p.latency_s == pytest.approx(100 / 400 + 1000 * 0.08)
    # by hand: 8100 cells pad to 8192; batch 100 (the prompt)
    kv = 28672 * 8192
    logits = 4 * 151936 * 100
    compute = 4 * 100 * (151936 + 3 * 8960 + 6 * 1536) + 4 * 100 * 12 * 8192
    assert p.memory_bytes == 1200 * MIB + kv + logits + compute == 1_668_481_024


def test_auto_picks_highest_fitting_effort_and_says_why():
    unlimited = choose(Effort.AUTO, FACTS, CAL, REQ, Budget())
    assert unlimited.effort is Effort.HIGH and unlimited.k == 32
    lat = choose(Effort.AUTO, FACTS, CAL, REQ, Budget(latency_s=90))
    assert lat.effort is Effort.MEDIUM  # 80.25 s fits, 260.25 s does not
    assert "auto chose medium" in lat.reason and "would not fit" in lat.reason
    tight = choose(Effort.AUTO, FACTS, CAL, REQ, Budget(latency_s=60))
    assert tight.effort is Effort.LOW


def test_nothing_fits():
    with pytest.raises(BudgetError, match="no effort mode fits"):
        choose(Effort.AUTO, FACTS, CAL, REQ, Budget(latency_s=10))
    plan = choose(
        Effort.AUTO, FACTS, CAL, Request(100, 100), Budget(latency_s=5.3, allow_degrade=True)
    )
    assert plan.degraded and plan.k == 1
    with pytest.raises(BudgetError):
        choose(Effort.AUTO, FACTS, CAL, REQ, Budget(memory_bytes=100 * MIB, allow_degrade=True))


def test_fixed_effort_checked_against_budget():
    assert choose(Effort.LOW, FACTS, CAL, REQ, Budget(latency_s=60)).k == 2
    with pytest.raises(BudgetError, match="effort high does not fit"):
        choose(Effort.HIGH, FACTS, CAL, REQ, Budget(latency_s=60))


def test_context_too_long():
    with pytest.raises(BudgetError, match="context"):
        choose(Effort.AUTO, FACTS, CAL, Request(131000, 1000), Budget())


def test_invalid_budgets():
    with pytest.raises(InvalidRequestError):
        Budget(latency_s=0)
    with pytest.raises(InvalidRequestError):
        Budget(memory_bytes=-1)


def test_never_over_budget_and_monotone():
    latencies = [None, 5, 20, 40, 60, 90, 150, 300, 1000]
    memories = [None, *[m * MIB for m in (1500, 2000, 2500, 3000, 4000, 6000, 10000)]]
    rank = {Effort.LOW: 1, Effort.MEDIUM: 2, Effort.HIGH: 3}

    def k_for(lat, mem):
        try:
            plan = choose(Effort.AUTO, FACTS, CAL, REQ, Budget(lat, mem))
        except BudgetError:
            return 0
        if mem is not None:
            assert plan.prediction.memory_bytes <= mem
        if lat is not None:
            assert plan.prediction.latency_s <= lat
        return rank[plan.effort]

    grid = {(lat, mem): k_for(lat, mem) for lat, mem in itertools.product(latencies, memories)}
    order = lambda v: float("inf") if v is None else v  # noqa: E731
    for (l1, m1), (l2, m2) in itertools.product(grid, grid):
        if order(l1) <= order(l2) and order(m1) <= order(m2):
            assert grid[(l1, m1)] <= grid[(l2, m2)], ((l1, m1), (l2, m2))
    assert len(set(grid.values())) == 4  # the grid exercises every outcome


def test_calibration_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_METASTONE_CACHE", str(tmp_path))
    cal = Calibration(CAL.step_seconds, 400.0, 1200 * MIB, 2, {8: 1e-8}, key="abc")
    scheduler.store(cal)
    back = scheduler.load_cached("abc")
    assert back == cal
    assert scheduler.load_cached("missing") is None
    (tmp_path / "calibration" / "abc.json").write_text("{broken")
    assert scheduler.load_cached("abc") is None


def test_prediction_counts_attention_over_the_unified_cache():
    import dataclasses

    cal = dataclasses.replace(CAL, attn_s_per_seq_cell={2: 4e-8, 8: 2e-8, 32: 1e-8})
    extra = 2e-8 * 8 * (1000 * 100 + 8 * 1000 * 1001 / 2)
    assert predict(FACTS, cal, REQ, 8).latency_s == pytest.approx(100 / 400 + 80 + extra)
    assert cal.attn_time(4) == pytest.approx(3e-8)
    assert cal.attn_time(64) == cal.attn_time(32) == 1e-8


@pytest.mark.parametrize(("n_ctx", "n_batch", "n_seq"), [(1000, 100, 4), (5000, 512, 8)])
def test_memory_model_against_llama_cpp_buffers(tiny_gguf, caplog, n_ctx, n_batch, n_seq):
    """llama.cpp's own reported buffer sizes are the reference: the KV cache exactly, the output
    and compute buffers bounded from above (the scheduler must not promise memory it lacks)."""
    import logging
    import re

    from edge_metastone.engine.llama import Context, ContextSettings, Model
    from edge_metastone.modelfile import open_model_file

    path = tiny_gguf("q8_0")
    facts = ModelFacts.of(open_model_file(path))
    caplog.set_level(logging.INFO, logger="llama_cpp.native")
    with (
        Model(path) as m,
        Context(m, ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq)),
    ):
        pass
    text = caplog.text

    def mib(pattern: str) -> float:
        found = re.search(pattern + r"\s*=\s*([0-9.]+) MiB", text)
        assert found, f"no {pattern!r} in llama.cpp's log"
        return float(found.group(1)) * MIB

    kv = mib(r"CPU KV buffer size")
    assert abs(facts.kv_bytes(n_ctx) - kv) <= 0.005 * MIB, (facts.kv_bytes(n_ctx), kv)
    actual = mib(r"CPU compute buffer size") + mib(r"CPU\s+output buffer size")
    predicted = facts.context_bytes(n_ctx, n_batch) - facts.kv_bytes(n_ctx)
    assert actual <= predicted <= 6 * actual, (predicted / MIB, actual / MIB)
