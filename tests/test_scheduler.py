"""The budget scheduler on synthetic cost tables: exact decisions, budgets never exceeded."""

from __future__ import annotations

import itertools

import pytest

from edge_metastone import calibration, scheduler
from edge_metastone.errors import BudgetError, InvalidRequestError
from edge_metastone.kvpolicy import flash_attention, kv_cells, score_matrix_bytes
from edge_metastone.scheduler import (
    MIB,
    Budget,
    Calibration,
    Effort,
    Request,
    choose,
    context_bytes,
    kv_bytes,
    predict,
)
from edge_metastone.types import KVLayout, KVType, ModelFacts

FACTS = ModelFacts(
    weight_bytes=1000 * MIB,
    n_layers=28,
    n_kv_heads=2,
    head_dim=128,
    n_embd=1536,
    n_ff=8960,
    n_heads=12,
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
    assert kv_bytes(FACTS, 1) == 28672 * 256
    assert kv_bytes(FACTS, 257) == 28672 * 512


def test_kv_bytes_of_quantized_types():
    # q8_0: 34 bytes per 32 elements; q4_0: 18 per 32 (ggml's blocks)
    assert kv_bytes(FACTS, 256, KVType.Q8_0) == 2 * 28 * 256 * 34 // 32 * 256
    assert kv_bytes(FACTS, 256, KVType.Q4_0) == 2 * 28 * 256 * 18 // 32 * 256


def test_kv_cells_per_layout():
    # unified: the prompt once, then k x new; streams: each stream its own prompt, 256-padded
    assert kv_cells(100, 1000, 8, KVLayout.UNIFIED) == 8192
    assert kv_cells(100, 1000, 8, KVLayout.STREAMS) == 8 * 1280
    assert kv_cells(100, 1000, 8, KVLayout.AUTO) == 8 * 1280  # AUTO: streams at k >= 2
    assert kv_cells(100, 1000, 1, KVLayout.AUTO) == 1280


def test_auto_layout_keeps_long_prompts_in_one_cache():
    """AUTO: streams for k >= 2 unless k copies of the prompt would make the cache more than 1.5x
    the unified one (before llama.cpp's padding); one candidate runs unified."""
    from edge_metastone.kvpolicy import resolve_layout

    assert resolve_layout(KVLayout.AUTO, 1, 100, 1000) is KVLayout.UNIFIED
    assert resolve_layout(KVLayout.AUTO, 8, 100, 1000) is KVLayout.STREAMS  # 8800 vs 8100 cells
    assert resolve_layout(KVLayout.AUTO, 8, 500, 1000) is KVLayout.STREAMS  # 12000 vs 8500
    assert resolve_layout(KVLayout.AUTO, 8, 1000, 1000) is KVLayout.UNIFIED  # 16000 vs 9000
    assert resolve_layout(KVLayout.AUTO, 8, 39, 256) is KVLayout.STREAMS  # 2360 vs 2087
    assert resolve_layout(KVLayout.AUTO, 8, 40, 16) is KVLayout.UNIFIED  # 448 vs 168
    assert resolve_layout(KVLayout.AUTO, 32, 4000, 1024) is KVLayout.UNIFIED  # 4.4x the cells
    assert resolve_layout(KVLayout.STREAMS, 32, 4000, 1024) is KVLayout.STREAMS  # named: kept
    assert predict(FACTS, CAL, Request(4000, 1024), 32).layout is KVLayout.UNIFIED


def test_prediction_exact():
    for layout, cells in ((KVLayout.AUTO, 8 * 1280), (KVLayout.UNIFIED, 8192)):
        p = predict(FACTS, CAL, REQ, 8, layout)
        assert p.latency_s == pytest.approx(100 / 400 + 1000 * 0.08)
        assert p.layout is (KVLayout.UNIFIED if cells == 8192 else KVLayout.STREAMS)
        # by hand: batch 100 (the prompt); plain attention's F32 scores (12 heads) and mask, each
        # row over its own stream's cells (streams: 1280 each), under 64 MiB so it runs
        kv = 28672 * cells
        logits = 4 * 151936 * 100
        compute = 4 * 100 * (151936 + 3 * 8960 + 6 * 1536)
        scores = 4 * 13 * (1280 if cells != 8192 else 8192) * 100
        assert p.memory_bytes == 1200 * MIB + kv + logits + compute + scores
    assert predict(FACTS, CAL, REQ, 8).memory_bytes == 1_687_879_680 + 6_656_000
    assert predict(FACTS, CAL, REQ, 8, KVLayout.UNIFIED).memory_bytes == 1_629_159_424 + 42_598_400


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
    # over a latency budget a fixed effort still runs: it stops at the deadline (README)
    plan = choose(Effort.HIGH, FACTS, CAL, REQ, Budget(latency_s=60))
    assert plan.effort is Effort.HIGH and plan.k == 32
    assert "until the deadline" in plan.reason and "best candidate so far" in plan.reason
    # a memory budget it cannot fit in any layout or KV type still refuses it
    with pytest.raises(BudgetError, match="effort high does not fit the memory budget"):
        choose(Effort.HIGH, FACTS, CAL, REQ, Budget(latency_s=60, memory_bytes=1300 * MIB))


def test_fixed_effort_over_latency_keeps_the_layout_that_fits_memory():
    """Over its latency budget, a fixed effort runs the way that fits its memory budget."""
    req = Request(prompt_tokens=400, max_new_tokens=1000)
    unified = predict(FACTS, CAL, req, 8, KVLayout.UNIFIED)
    plan = choose(Effort.MEDIUM, FACTS, CAL, req, Budget(1.0, unified.memory_bytes))
    assert plan.prediction == unified and "until the deadline" in plan.reason


def test_auto_refusal_names_allow_degrade_and_degrade_runs_to_the_deadline():
    """Auto refuses only without --allow-degrade (and the message names it); with it, one
    candidate runs even when it is predicted over the budget, until the deadline."""
    with pytest.raises(BudgetError, match="--allow-degrade") as e:
        choose(Effort.AUTO, FACTS, CAL, REQ, Budget(latency_s=10))
    assert "until the deadline" in str(e.value)  # k=1 needs ~50 s: it would run to the deadline
    with pytest.raises(BudgetError, match=r"--allow-degrade .*runs one candidate, predicted"):
        choose(Effort.AUTO, FACTS, CAL, Request(100, 100), Budget(latency_s=5.3))
    plan = choose(Effort.AUTO, FACTS, CAL, REQ, Budget(latency_s=10, allow_degrade=True))
    assert plan.degraded and plan.k == 1 and "until the deadline" in plan.reason


def test_effort_modes_are_a_table():
    """k and what auto may pick come from `MODES`: a new mode is one row."""
    assert [e.k for e in scheduler.FIXED_EFFORTS] == [2, 8, 32]
    assert Effort.AUTO.mode.chooses and not Effort.MEDIUM.mode.chooses
    assert all(scheduler.MODES[e].k == e.k for e in scheduler.FIXED_EFFORTS)
    with pytest.raises(ValueError, match="no fixed k"):
        _ = Effort.AUTO.k


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
    calibration.store(cal)
    back = calibration.load_cached("abc")
    assert back == cal
    assert calibration.load_cached("missing") is None
    (tmp_path / "calibration" / "abc.json").write_text("{broken")
    assert calibration.load_cached("abc") is None


def test_prediction_counts_attended_and_masked_cells():
    """Streams: each of k candidates attends to its prompt + s cells at step s. Unified: the same,
    plus (k-1) x s cells of the other candidates it is masked out of."""
    import dataclasses

    cal = dataclasses.replace(
        CAL,
        attn_s_per_seq_cell={2: 4e-8, 8: 2e-8, 32: 1e-8},
        masked_s_per_seq_cell=3e-9,
        quantized_attn_factor=1.5,
    )
    attended = 8 * (1000 * 100 + 1000 * 1001 / 2)
    masked = 8 * 7 * 1000 * 1001 / 2
    base = 100 / 400 + 80
    streams = predict(FACTS, cal, REQ, 8, KVLayout.STREAMS)
    assert streams.latency_s == pytest.approx(base + 2e-8 * attended)
    unified = predict(FACTS, cal, REQ, 8, KVLayout.UNIFIED)
    assert unified.latency_s == pytest.approx(base + 2e-8 * attended + 3e-9 * masked)
    q8 = predict(FACTS, cal, REQ, 8, KVLayout.STREAMS, KVType.Q8_0)
    assert q8.latency_s == pytest.approx(base + 1.5 * 2e-8 * attended)
    assert q8.memory_bytes < streams.memory_bytes
    assert cal.attn_time(4) == pytest.approx(3e-8)
    assert cal.attn_time(64) == cal.attn_time(32) == 1e-8


def test_tight_memory_picks_the_smaller_layout_then_q8_0_and_says_so():
    req = Request(prompt_tokens=400, max_new_tokens=1000)  # streams: 8 x 1536 cells, unified 8448
    streams = predict(FACTS, CAL, req, 8)
    unified = predict(FACTS, CAL, req, 8, KVLayout.UNIFIED)
    q8 = predict(FACTS, CAL, req, 8, KVLayout.UNIFIED, KVType.Q8_0)
    assert q8.memory_bytes < unified.memory_bytes < streams.memory_bytes
    plan = choose(Effort.MEDIUM, FACTS, CAL, req, Budget(memory_bytes=streams.memory_bytes))
    assert (plan.prediction.layout, plan.prediction.kv_type) == (KVLayout.STREAMS, KVType.F16)
    assert "would not fit" not in plan.reason
    plan = choose(Effort.MEDIUM, FACTS, CAL, req, Budget(memory_bytes=unified.memory_bytes))
    assert plan.prediction == unified
    assert "(unified)" in plan.reason and "the default k=8 (streams)" in plan.reason
    plan = choose(Effort.AUTO, FACTS, CAL, req, Budget(memory_bytes=q8.memory_bytes))
    assert plan.k == 8 and plan.prediction == q8  # k=32 does not fit even with q8_0
    assert "q8_0 KV" in plan.reason and "would not fit" in plan.reason
    # a backend without a quantized cache or a unified layout is never planned with one
    with pytest.raises(BudgetError):
        choose(
            Effort.MEDIUM,
            FACTS,
            CAL,
            req,
            Budget(memory_bytes=q8.memory_bytes),
            layouts=(KVLayout.STREAMS,),
            kv_types=(KVType.F16,),
        )


@pytest.mark.parametrize(
    ("prompt", "new", "k", "layout", "kv_type"),
    [
        (100, 225, 4, "unified", "f16"),
        (512, 600, 8, "unified", "f16"),
        (100, 225, 4, "streams", "f16"),
        (512, 600, 8, "streams", "q8_0"),
        (40, 300, 8, "unified", "q4_0"),
    ],
)
def test_memory_model_against_llama_cpp_buffers(tiny_gguf, caplog, prompt, new, k, layout, kv_type):
    """llama.cpp's own reported buffer sizes are the reference: the KV cache exactly (each layout,
    each KV type), the output and compute buffers bounded from above (the scheduler must not
    promise memory it lacks)."""
    import logging
    import re

    from edge_metastone.engine.engine import model_facts
    from edge_metastone.engine.llama import Context, ContextSettings, Model
    from edge_metastone.limits import PREFILL_BATCH
    from edge_metastone.modelfile.read import open_model_file

    path = tiny_gguf("q8_0")
    facts = model_facts(open_model_file(path))
    caplog.set_level(logging.INFO, logger="llama_cpp.native")
    layout, kv_type = KVLayout(layout), KVType(kv_type)
    n_ctx = kv_cells(prompt, new, k, layout)
    n_batch = max(min(prompt, PREFILL_BATCH), k)
    streams = k if layout is KVLayout.STREAMS else 1
    settings = ContextSettings(
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_seq_max=k,
        kv_unified=layout is KVLayout.UNIFIED,
        kv_type=kv_type.value,
        flash_attn=flash_attention(kv_type, facts.n_heads, n_ctx, n_batch, streams),
    )
    with Model(path) as m, Context(m, settings):
        pass
    text = caplog.text

    def mib(pattern: str) -> float:
        found = re.search(pattern + r"\s*=\s*([0-9.]+) MiB", text)
        assert found, f"no {pattern!r} in llama.cpp's log"
        return float(found.group(1)) * MIB

    kv = mib(r"CPU KV buffer size")
    # the log rounds to 0.01 MiB
    assert abs(kv_bytes(facts, n_ctx, kv_type) - kv) <= 0.0051 * MIB, (kv_bytes(facts, n_ctx), kv)
    actual = mib(r"CPU compute buffer size") + mib(r"CPU\s+output buffer size")
    predicted = context_bytes(facts, n_ctx, n_batch, kv_type, streams) - kv_bytes(
        facts, n_ctx, kv_type
    )
    assert actual <= predicted <= 2 * actual, (predicted / MIB, actual / MIB)


def _compute_buffer(path, caplog, settings) -> float:
    """llama.cpp's reported CPU compute buffer, in bytes, for a context made with `settings`."""
    import logging
    import re

    from edge_metastone.engine.llama import Context, Model

    caplog.clear()
    caplog.set_level(logging.INFO, logger="llama_cpp.native")
    with Model(path) as m, Context(m, settings):
        pass
    found = re.search(r"CPU compute buffer size\s*=\s*([0-9.]+) MiB", caplog.text)
    assert found, "no compute buffer size in llama.cpp's log"
    return float(found.group(1)) * MIB


@pytest.mark.parametrize(("n_ctx", "n_batch", "streams"), [(4096, 512, 1), (8192, 64, 8)])
def test_plain_attention_score_matrix_against_llama_cpp(tiny_gguf, caplog, n_ctx, n_batch, streams):
    """Plain attention's extra compute buffer (llama.cpp's log, flash attention off minus on, same
    context otherwise) is what `score_matrix_bytes` charges for it, to within 2x from above."""
    from edge_metastone.engine.engine import model_facts
    from edge_metastone.engine.llama import ContextSettings
    from edge_metastone.modelfile.read import open_model_file

    path = tiny_gguf("q8_0")
    facts = model_facts(open_model_file(path))
    base = {"n_ctx": n_ctx, "n_batch": n_batch, "n_seq_max": streams, "kv_unified": streams == 1}
    plain = _compute_buffer(path, caplog, ContextSettings(**base, flash_attn=False))
    flash = _compute_buffer(path, caplog, ContextSettings(**base, flash_attn=True))
    charged = score_matrix_bytes(facts.n_heads, n_ctx, n_batch, streams)
    assert plain - flash <= charged <= 2 * (plain - flash), (charged / MIB, (plain - flash) / MIB)


def test_flash_attention_rule():
    """Plain attention for an F16 cache while its score matrix is small; flash attention for a
    quantized cache (llama.cpp needs it for a quantized V) or a large matrix."""
    assert not flash_attention(KVType.F16, 14, 2048, 512)  # 56 MiB: 4 * 14 * 2048 * 512 bytes
    assert flash_attention(KVType.F16, 14, 4096, 512)  # 112 MiB
    assert not flash_attention(KVType.F16, 14, 8192, 512, n_streams=4)  # each row sees a quarter
    assert flash_attention(KVType.Q8_0, 1, 256, 1)


def test_a_request_beside_others_is_predicted_at_the_batch_it_joins():
    """In a shared context every step also decodes the other requests' rows: k=2 beside 14 other
    sequences costs a step of 16 rows (no attention cost in CAL: exactly the step time)."""
    alone = predict(FACTS, CAL, REQ, 2)
    beside = predict(FACTS, CAL, Request(100, 1000, others=14), 2)
    prefill = 100 / CAL.prefill_tokens_per_s
    assert alone.latency_s == pytest.approx(prefill + 1000 * CAL.step_time(2))
    assert beside.latency_s == pytest.approx(prefill + 1000 * CAL.step_time(16))
    assert beside.memory_bytes == alone.memory_bytes  # its own cells: the others' are theirs
    # auto under a budget that k=8 meets alone but not beside 4 other sequences picks less
    budget = Budget(latency_s=predict(FACTS, CAL, REQ, 8).latency_s * 1.01)
    assert choose(Effort.AUTO, FACTS, CAL, REQ, budget).k == 8
    crowded = choose(Effort.AUTO, FACTS, CAL, Request(100, 1000, others=4), budget)
    assert crowded.k < 8
