"""The backend boundary: the neutral core loads no runtime, the whole `Reasoner` runs on any
`Backend` (here the scripted fake), and the model path picks the runtime."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from fake_backend import FakeBackend, Script

from conftest import REPO, parked_at_gate, run_cli, wait_until
from edge_metastone.backend import Backend
from edge_metastone.calibration import calibration_key
from edge_metastone.errors import BadModelFileError, InvalidRequestError
from edge_metastone.reasoner import Reasoner
from edge_metastone.runtime import open_backend
from edge_metastone.scheduler import MIB, Calibration
from edge_metastone.sprm import trajectory_score
from edge_metastone.types import FinishEvent, StepEvent, TokenEvent

CAL = Calibration({1: 0.01, 2: 0.011, 4: 0.012, 8: 0.015, 16: 0.02, 32: 0.03}, 2000.0, 200 * MIB, 2)


def test_the_core_imports_no_runtime():
    """Search, the Reasoner's module, the scheduler, calibration and the fronts' types load
    neither llama.cpp nor onnxruntime (nor torch)."""
    code = (
        "import sys\n"
        "import edge_metastone.search, edge_metastone.reasoner, edge_metastone.scheduler\n"
        "import edge_metastone.backend, edge_metastone.types, edge_metastone.calibration\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('llama_cpp', 'onnxruntime', 'torch'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_both_backends_implement_the_protocol(tiny_gguf):
    assert isinstance(FakeBackend([Script([0.5])]), Backend)
    with open_backend(tiny_gguf("q8_0")) as engine:
        assert isinstance(engine, Backend)
        assert engine.runtime.startswith("llama.cpp")
        assert engine.facts.n_layers == engine.model_file.n_layers


SCRIPTS = [
    Script([0.5, 0.5], "</think> \\boxed{4}"),
    Script([0.9, 0.8], "</think> \\boxed{5}"),
    Script([0.3, 0.4], "</think> \\boxed{4}"),
    Script([0.1, 0.2], "</think> \\boxed{4}"),
]


def test_reasoner_runs_on_a_fake_backend():
    fake = FakeBackend(SCRIPTS)
    with Reasoner(backend=fake, calibration=CAL) as r:
        res = r.reason("What is 2+2?", effort="low", seed=1)
        assert res.k == 2 and res.chosen == 1 and res.answer == "5"
        assert res.prompt_text == "[user]What is 2+2?\n[assistant]"
        assert res.candidates[1].score == pytest.approx(trajectory_score([0.9, 0.8]))
        # timings are this request's own: the tokens it generated, not another call's
        assert res.timings["generated_tokens"] == sum(c.tokens for c in res.candidates) == 40
        res8 = r.reason("What is 2+2?", effort="medium", strategy="vote")
        assert res8.k == 8 and res8.answer == "4" and res8.strategy == "vote"
        assert res8.timings["generated_tokens"] == 160
    assert fake.closed


def test_the_plans_kv_layout_and_type_reach_the_backend():
    """The scheduler's layout and KV type go into the generation settings (without a memory
    budget: what AUTO runs, F16; with a tight one: what fits), and the result says so."""
    from edge_metastone.scheduler import Request, predict
    from edge_metastone.types import KVLayout, KVType

    fake = FakeBackend(SCRIPTS)
    with Reasoner(backend=fake, calibration=CAL, max_new_tokens=2000) as r:
        res = r.reason("What is 2+2?", effort="medium")
        assert fake.settings_seen[-1].kv_layout is KVLayout.STREAMS  # what AUTO runs here
        assert fake.settings_seen[-1].kv_type is KVType.F16
        assert res.timings["kv_layout"] == "streams" and res.timings["kv_type"] == "f16"
        n = len(r.encode("What is 2+2?")[1])
        q8 = predict(fake.facts, CAL, Request(n, 2000), 8, KVLayout.UNIFIED, KVType.Q8_0)
        res = r.reason("What is 2+2?", effort="medium", memory_budget=q8.memory_bytes / MIB)
        assert fake.settings_seen[-1].kv_layout is KVLayout.UNIFIED
        assert fake.settings_seen[-1].kv_type is KVType.Q8_0
        assert res.timings["kv_layout"] == "unified" and res.timings["kv_type"] == "q8_0"
        assert "q8_0 KV" in res.scheduler_reason and "would not fit" in res.scheduler_reason
        # the request may name the KV type itself (the CLI's --kv-cache)
        res = r.reason("What is 2+2?", effort="low", kv_cache="q8_0")
        assert fake.settings_seen[-1].kv_type is KVType.Q8_0
        fake.kv_types = (KVType.F16,)  # a runtime without a quantized cache (ONNX)
        with pytest.raises(InvalidRequestError, match="no q8_0 KV cache"):
            r.reason("What is 2+2?", effort="low", kv_cache="q8_0")


def test_default_strategy_comes_from_the_backend():
    with Reasoner(backend=FakeBackend(SCRIPTS, default_strategy="vote"), calibration=CAL) as r:
        assert r.default_strategy.value == "vote"
    # a selector that needs a head is not taken for a model without one
    fake = FakeBackend(SCRIPTS, has_head=False, default_strategy="best-of-k")
    with Reasoner(backend=fake, calibration=CAL) as r:
        assert r.default_strategy.value == "logprob"


def test_stream_on_a_fake_backend_rebuilds_the_result():
    with Reasoner(backend=FakeBackend(SCRIPTS), calibration=CAL) as r:
        texts: dict[int, str] = {}
        steps: dict[int, list[float]] = {}
        for ev in r.reason_stream("hi", effort="low"):
            if isinstance(ev, TokenEvent):
                texts[ev.candidate] = texts.get(ev.candidate, "") + ev.text
            elif isinstance(ev, StepEvent):
                steps.setdefault(ev.candidate, []).append(ev.score)
            elif isinstance(ev, FinishEvent):
                texts[ev.candidate] += ev.text_tail
            else:
                result = ev
        assert [texts[c.index] for c in result.candidates] == [c.text for c in result.candidates]
        assert [steps[c.index] for c in result.candidates] == [
            c.step_scores for c in result.candidates
        ]


def test_close_waits_for_the_running_generation():
    """close() during a stream cancels the generation and frees the backend only after it has
    unwound (the fake asserts that no generation is live when it is closed)."""
    fake = FakeBackend([Script([0.5] * 200, every=10)], round_s=0.001)  # ~2 s uncancelled
    r = Reasoner(backend=fake, calibration=CAL)
    stream = r.reason_stream("hi", effort="low")
    next(stream)
    assert fake.live_generations == 1
    t0 = time.monotonic()
    r.close()
    assert time.monotonic() - t0 < 1.0 and fake.closed and fake.live_generations == 0
    assert fake.generated < 2 * 2000


def test_a_stream_whose_reasoner_closes_ends_with_a_closed_error():
    """The consumer of a stream learns that the reasoner closed under it: the iterator raises
    "closed" instead of waiting forever for events that will never come."""
    fake = FakeBackend([Script([0.5] * 200, every=10)], round_s=0.001)
    r = Reasoner(backend=fake, calibration=CAL)
    stream = r.reason_stream("hi", effort="low")
    next(stream)
    r.close()
    outcome: list[object] = []

    def drain() -> None:
        try:
            for _ in stream:
                pass
            outcome.append("ended without an error")
        except Exception as e:
            outcome.append(e)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    t.join(10)
    assert outcome, "the stream still waits after its reasoner closed"
    assert isinstance(outcome[0], Exception) and "closed" in str(outcome[0]), outcome


def test_a_queued_request_plans_with_the_time_it_has_left():
    """The latency budget counts from arrival: a request queued behind a 0.4 s one plans with
    what is left (1.7 s budget: medium on an idle model, 1.5 s predicted; low after 0.4 s queued)."""
    fake = FakeBackend([Script([0.5] * 20, every=10)], round_s=0.001)
    with Reasoner(backend=fake, calibration=CAL, max_new_tokens=100) as r:
        idle = r.plan(10, effort="auto", latency_budget=1.7)
        out: dict = {}

        def request() -> None:
            try:
                out["result"] = r.reason("x" * 3, effort="auto", latency_budget=1.7)
            except Exception as e:
                out["error"] = e

        with r._gate.exclusive():  # a calibration holds the model for 0.4 s after this queued
            t = threading.Thread(target=request)
            t.start()
            parked = wait_until(lambda: parked_at_gate(t, "reason"), "the request to queue")
            wait_until(lambda: time.monotonic() > parked + 0.4, "0.4 s in the queue")
            assert parked_at_gate(t, "reason") and not out
        t.join()
        res = out["result"]
        assert res.timings["queue_s"] >= 0.4
        assert res.k < idle.k, (res.k, idle.k, res.scheduler_reason)


def test_calibration_runs_through_the_backend(tmp_path, private_cache):
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF")
    fake = FakeBackend([Script([0.5] * 10, every=10)], path=model)
    with Reasoner(backend=fake) as r:
        cal = r.calibration()
        assert set(cal.step_seconds) >= {1, 2, 8, 32} and cal.prefill_tokens_per_s > 0
        assert cal.key == calibration_key(model, r.n_threads, "fake", cal_key_extra(r))


def cal_key_extra(r: Reasoner) -> str:
    from edge_metastone.calibration import sampling_cost_key

    return sampling_cost_key(r.sampling)


def test_calibration_key_names_runtime_and_settings(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    base = calibration_key(model, 2, "llama.cpp 0.3.36 gpu-layers 0", "t1")
    assert base == calibration_key(model, 2, "llama.cpp 0.3.36 gpu-layers 0", "t1")
    assert base != calibration_key(model, 2, "llama.cpp 0.3.36 gpu-layers 99", "t1")
    assert base != calibration_key(model, 2, "llama.cpp 0.3.36 gpu-layers 0", "t0")
    assert base != calibration_key(model, 4, "llama.cpp 0.3.36 gpu-layers 0", "t1")


def test_the_model_path_picks_the_runtime(tmp_path):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    cases = [
        (empty_dir, "not an ONNX model directory"),
        (onnx_dir, "no metastone.json"),
        (text, "neither a GGUF file nor an ONNX model directory"),
        (tmp_path / "missing.gguf", "no such model file"),
    ]
    for path, message in cases:
        with pytest.raises(BadModelFileError, match=message):
            open_backend(path)
    proc = run_cli("reason", "--model", str(onnx_dir), "hi")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "ONNX" in proc.stderr, proc.stderr


def test_the_models_recorded_policy_is_read_once_when_it_opens(caplog):
    """Bad recorded keys are each warned about once, when the model opens (not once per request,
    as when each request parsed them), and stand as unrecorded: the default strategy falls back,
    the adaptive settings are the safe defaults, no combined selector."""
    import logging

    from edge_metastone.search.adaptive import AdaptiveSettings

    fake = FakeBackend(SCRIPTS * 8, default_strategy="no-such-strategy")
    fake.adaptive = "{not json"
    fake.selector = '{"version": 0}'
    fake.thinking_scaling = "[1, 2]"
    with caplog.at_level(logging.WARNING), Reasoner(backend=fake, calibration=CAL) as r:
        for effort in ("low", "adaptive", "auto"):
            r.reason("hi", effort=effort, latency_budget=30.0)
            r.reason("hi", effort=effort)
        assert r.default_strategy.value == "best-of-k" and r.records.selector is None
        assert r.records.adaptive == AdaptiveSettings() and r.records.thinking_scaling is None
    said = [rec.getMessage() for rec in caplog.records]
    for what in (
        "unknown default strategy",
        "recorded adaptive settings",
        "recorded selector",
        "thinking-scaling table",
    ):
        assert sum(what in m for m in said) == 1, (what, said)


def test_the_latency_budget_counts_from_arrival_and_the_result_says_what_stopped_it():
    """A request that arrived before `reason` was called (a server's queue) has spent the wait
    from its budget: spent whole, it is refused before any token. Otherwise the search stops at
    its budget (`stopped_by` "latency_budget") or at the caller's hard deadline ("time_limit"),
    whichever comes first; a run that ends by itself was stopped by neither."""
    from edge_metastone.errors import BudgetError

    fake = FakeBackend([Script([0.5] * 200, every=10)] * 2, round_s=0.001)  # 0.2 s at least
    with Reasoner(backend=fake, calibration=CAL) as r:
        with pytest.raises(BudgetError, match="ran out while waiting"):
            r.reason("hi", effort="low", latency_budget=5.0, arrival=time.monotonic() - 10)
        assert fake.calls == 0
        res = r.reason("hi", effort="low", latency_budget=0.05)
        assert res.early_stop and res.stopped_by == "latency_budget"
        res = r.reason("hi", effort="low", latency_budget=60.0, deadline=time.monotonic() + 0.05)
        assert res.early_stop and res.stopped_by == "time_limit"
        assert "stopped early at the request's time limit" in res.scheduler_reason
        res = r.reason("hi", effort="low")
        assert not res.early_stop and res.stopped_by == ""
