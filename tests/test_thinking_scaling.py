"""`--effort auto` on both axes: the model's thinking-scaling table (`metastone.thinking_scaling`)
is read and checked like any untrusted record, and under a latency budget auto runs the table's
most accurate (k, thinking budget) predicted to fit, says why, and runs it: each candidate's
thought ends at the chosen budget."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from edge_metastone import keys
from edge_metastone.modelfile.copy import write_model_copy
from edge_metastone.options import ReasonOptions
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import MIB, Budget, Calibration, Effort, Request, predict
from edge_metastone.thinking_scaling import ScalingPoint, ScalingTable, plan_two_axis
from edge_metastone.types import KVLayout, KVType, ModelFacts

FACTS = ModelFacts(
    weight_bytes=100 * MIB,
    n_layers=8,
    n_kv_heads=2,
    head_dim=64,
    n_embd=256,
    n_ff=768,
    n_heads=4,
    n_vocab=512,
    n_ctx_train=4096,
    head_bytes=0,
)
CAL = Calibration(
    step_seconds={1: 0.01, 2: 0.011, 4: 0.012, 8: 0.016, 16: 0.028, 32: 0.052},
    prefill_tokens_per_s=2000.0,
    base_rss_bytes=200 * MIB,
    n_threads=2,
)
REQ = Request(prompt_tokens=40, max_new_tokens=160)
POINTS = (
    ScalingPoint(32, None, 0.80, 120, 60.0, 40.0),
    ScalingPoint(8, 16, 0.76, 40, 25.0, 15.0),
    ScalingPoint(16, 8, 0.74, 30, 18.0, 8.0),
    ScalingPoint(8, None, 0.75, 110, 58.0, 39.0),
    ScalingPoint(2, None, 0.62, 90, 57.0, 38.0),
)
TABLE = ScalingTable(POINTS, "logprob", 160, {"problems": 300, "seed": 2})
WAYS = {"layouts": (KVLayout.UNIFIED, KVLayout.STREAMS), "kv_types": (KVType.F16, KVType.Q8_0)}


def seconds(k: int, steps: int) -> float:
    return predict(FACTS, CAL, Request(40, steps), k).latency_s


def test_the_table_round_trips_through_its_json():
    assert ScalingTable.from_json(TABLE.to_json()) == TABLE
    assert ScalingTable.from_json(None) is None and ScalingTable.from_json("") is None


def _with(**change) -> str:
    d = json.loads(TABLE.to_json())
    d["points"][0].update(change.pop("point", {}))
    d.update(change)
    return json.dumps(d)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        _with(version=2),
        _with(points=[]),
        _with(points="many"),
        _with(point={"k": 0}),
        _with(point={"k": True}),
        _with(point={"k": 10**9}),
        _with(point={"accuracy": 1.5}),
        _with(point={"accuracy": float("nan")}),
        _with(point={"think_budget": -1}),
        _with(point={"think_budget": 2.5}),
        _with(point={"steps": 0}),
        _with(point={"tokens": -3}),
        json.dumps({"version": 1, "points": [{"k": 2}]}),
        _with(max_new_tokens="lots"),
    ],
)
def test_a_bad_record_is_ignored_with_a_warning(text, caplog):
    with caplog.at_level(logging.WARNING):
        assert ScalingTable.from_json(text) is None
    assert "thinking-scaling table" in caplog.text


def test_auto_chooses_the_most_accurate_point_that_fits_and_says_why():
    # k=32 unlimited (0.80) needs ~120 steps at 32 rows; k=8 with 16 thinking tokens ~40 at 8
    limit = (seconds(8, 110) + seconds(8, 40)) / 2
    assert seconds(32, 120) > seconds(8, 110) > limit > seconds(8, 40)  # nor k=8 unlimited
    plan = plan_two_axis(
        TABLE, FACTS, CAL, REQ, Budget(latency_s=limit), max_k=None, thinks=True, **WAYS
    )
    assert (plan.k, plan.think_budget, plan.effort) == (8, 16, Effort.MEDIUM)
    assert plan.prediction.latency_s == pytest.approx(seconds(8, 40))
    assert "k=8, thinking <= 16 tokens" in plan.reason and "0.760" in plan.reason
    assert "k=32, unlimited thinking (0.800), would not fit" in plan.reason
    roomy = plan_two_axis(
        TABLE, FACTS, CAL, REQ, Budget(latency_s=1e6), max_k=None, thinks=True, **WAYS
    )
    assert (roomy.k, roomy.think_budget) == (32, None)
    assert "would not fit" not in roomy.reason


def test_a_k_off_the_ladder_runs_as_auto_with_its_k():
    table = dataclasses.replace(TABLE, points=POINTS[2:3] + POINTS[4:])
    plan = plan_two_axis(
        table, FACTS, CAL, REQ, Budget(latency_s=1e6), max_k=None, thinks=True, **WAYS
    )
    assert (plan.k, plan.think_budget, plan.effort) == (16, 8, Effort.AUTO)


def test_max_k_markup_and_a_budget_nothing_fits_narrow_the_points():
    big = Budget(latency_s=1e6)
    capped = plan_two_axis(TABLE, FACTS, CAL, REQ, big, max_k=8, thinks=True, **WAYS)
    assert (capped.k, capped.think_budget) == (8, 16)
    plain = plan_two_axis(TABLE, FACTS, CAL, REQ, big, max_k=8, thinks=False, **WAYS)
    assert (plain.k, plain.think_budget) == (8, None)  # no think markup: no thinking budget
    tiny = Budget(latency_s=seconds(1, 1) / 10)
    assert plan_two_axis(TABLE, FACTS, CAL, REQ, tiny, max_k=None, thinks=True, **WAYS) is None
    memory = Budget(latency_s=1e6, memory_bytes=150 * MIB)  # below the loaded process
    assert plan_two_axis(TABLE, FACTS, CAL, REQ, memory, max_k=None, thinks=True, **WAYS) is None


def test_a_request_shorter_than_the_measured_steps_is_predicted_at_its_own_length():
    short = Request(40, 20)
    plan = plan_two_axis(
        TABLE, FACTS, CAL, short, Budget(latency_s=1e6), max_k=None, thinks=True, **WAYS
    )
    assert plan.prediction.latency_s == pytest.approx(seconds(32, 20))


@pytest.fixture(scope="module")
def nano_with_table(tmp_path_factory):
    """The embedded model's weights with this module's table (its own measured one aside), and
    a calibration given (so the choice does not depend on this machine's speed)."""
    from edge_metastone.models import default_model_path

    path = tmp_path_factory.mktemp("table") / "nano.gguf"
    write_model_copy(default_model_path(), path, extra={keys.THINKING_SCALING: TABLE.to_json()})
    with Reasoner(path, max_new_tokens=REQ.max_new_tokens, calibration=CAL) as r:
        yield r


def test_the_reasoner_runs_the_chosen_budget_and_reports_it(nano_with_table):
    r = nano_with_table
    q = "What is (17+25)*3-40?"
    _, ids = r.encode(q)
    facts = r.backend.facts
    limit = (
        predict(facts, CAL, Request(len(ids), 110), 8).latency_s
        + predict(facts, CAL, Request(len(ids), 40), 8).latency_s
    ) / 2
    o = ReasonOptions(effort="auto", latency_budget=limit, seed=3)
    plan = r.plan(len(ids), o)
    assert (plan.k, plan.think_budget) == (8, 16), plan.reason
    res = r.reason(q, dataclasses.replace(o, latency_budget=1e3 * limit))
    # a roomy budget: the table's best is high, and the model's adaptive settings replace high
    assert res.effort == "adaptive" and res.think_budget is None
    res = r.reason(q, dataclasses.replace(o, latency_budget=None))
    assert res.think_budget is None  # auto without a latency budget chooses k alone, as before
    planned = r.plan(len(ids), dataclasses.replace(o, think_budget=4, allow_degrade=True))
    # the request's own budget: the table is not used (k alone, at worst-case lengths: k=1 here)
    assert planned.think_budget is None and planned.k == 1 and "table" not in planned.reason


def test_a_chosen_budget_ends_each_long_thought(nano_with_table):
    r = nano_with_table
    table = ScalingTable((ScalingPoint(4, 3, 0.9, 30, 20.0, 3.0),), "logprob", 160, {})
    path = r.model_path.with_name("three.gguf")
    write_model_copy(r.model_path, path, extra={keys.THINKING_SCALING: table.to_json()})
    with Reasoner(path, max_new_tokens=160, calibration=CAL) as r3:
        res = r3.reason("What is 7*8-5?", effort="auto", latency_budget=1e6, max_k=4, seed=1)
    assert (res.k, res.think_budget) == (4, 3)
    assert res.to_json()["think_budget"] == 3 and "thinking <= 3 tokens" in res.scheduler_reason
    end = r3.backend.rule.think_end_id
    for c in res.candidates:
        assert c.thought_ended and c.token_ids[3] == end
