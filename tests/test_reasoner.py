"""The Reasoner API and `reason` CLI on the tiny fixture (real llama.cpp)."""

from __future__ import annotations

import pytest

from conftest import cli_json, run_cli
from edge_metastone.engine.scoring import score_tokens
from edge_metastone.errors import BudgetError
from edge_metastone.options import ReasonResult
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import MIB, Calibration
from edge_metastone.types import FinishEvent, SamplingSettings, StepEvent, TokenEvent

DELIM = 258
STEPPY = SamplingSettings(temperature=1.0, top_p=0.95, logit_bias=((DELIM, 4.0),))
CAL = Calibration({1: 0.01, 2: 0.011, 4: 0.012, 8: 0.015, 16: 0.02, 32: 0.03}, 2000.0, 200 * MIB, 2)


@pytest.fixture(scope="module")
def reasoner(tiny_gguf):
    with Reasoner(tiny_gguf("f32"), sampling=STEPPY, max_new_tokens=60, calibration=CAL) as r:
        yield r


def test_reason_low_effort(reasoner):
    res = reasoner.reason("What is 12 + 7?", effort="low", seed=3)
    assert res.k == 2 and len(res.candidates) == 2 and res.effort == "low"
    scores = [c.score for c in res.candidates]
    assert res.chosen == max(range(2), key=lambda i: (scores[i], -i))
    assert res.answer == res.candidates[res.chosen].answer
    assert res.prompt_text.endswith("<|im_start|>assistant\n<think>\n")
    assert res.strategy == "best-of-k" and "low requested" in res.scheduler_reason


def test_candidates_rescore_outside_the_engine(reasoner):
    """prompt_text + each candidate's token_ids score the same through the one-pass scorer."""
    res = reasoner.reason("Add 3 and 4.", effort="medium", seed=1)
    eng = reasoner.backend
    prompt_ids = eng.tokenize(res.prompt_text)
    assert sum(len(c.step_scores) for c in res.candidates) > 0
    for c in res.candidates:
        ref = score_tokens(eng.model_file, eng.model, prompt_ids + c.token_ids, parity=False)
        # default (fast) mode keeps the KV cache in F16; F32 parity mode is held to 1e-4 elsewhere
        assert c.step_scores == pytest.approx(ref.step_scores, abs=1e-2)
        assert eng.model.detokenize(c.token_ids) == c.text


def test_auto_effort_uses_budgets(reasoner):
    # predicted latency: 30 / 2000 + 60 * step_time(k): low 0.675 s, medium 0.915 s, high 1.815 s
    assert (
        reasoner.plan(30, effort="auto", latency_budget=2.0, max_new_tokens=60).effort.value
        == "high"
    )
    assert (
        reasoner.plan(30, effort="auto", latency_budget=1.0, max_new_tokens=60).effort.value
        == "medium"
    )
    res = reasoner.reason("Hi", effort="auto", latency_budget=0.8, seed=2)
    assert res.k == 2 and "auto chose low" in res.scheduler_reason
    with pytest.raises(BudgetError):
        reasoner.reason("Hi", effort="auto", latency_budget=0.01)


def test_latency_budget_stops_early(tiny_gguf):
    slow = Calibration({1: 1e-5, 32: 1e-5}, 1e6, 1, 2)  # predicts everything is instant
    with Reasoner(tiny_gguf("f32"), sampling=STEPPY, max_new_tokens=3000, calibration=slow) as r:
        res = r.reason("Count.", effort="medium", latency_budget=0.5, seed=0)
    assert res.early_stop and "stopped early" in res.scheduler_reason
    assert res.timings["total_s"] < 3.0
    assert all(c.tokens < 3000 for c in res.candidates)


def test_reason_stream(reasoner):
    texts: dict[int, str] = {}
    steps: dict[int, list[float]] = {}
    final = None
    for item in reasoner.reason_stream("What is 2+3?", effort="low", seed=4):
        if isinstance(item, ReasonResult):
            final = item
        elif isinstance(item, TokenEvent):
            texts[item.candidate] = texts.get(item.candidate, "") + item.text
        elif isinstance(item, StepEvent):
            steps.setdefault(item.candidate, []).append(item.score)
        elif isinstance(item, FinishEvent):
            texts[item.candidate] = texts.get(item.candidate, "") + item.text_tail
    assert final is not None and final.k == 2
    for c in final.candidates:  # the stream rebuilds every candidate
        assert texts[c.index] == c.text
        assert steps.get(c.index, []) == pytest.approx(c.step_scores)
    assert sum(len(v) for v in steps.values()) > 0
    direct = reasoner.reason("What is 2+3?", effort="low", seed=4)  # same seed, same result
    assert [c.token_ids for c in direct.candidates] == [c.token_ids for c in final.candidates]
    assert direct.chosen == final.chosen and direct.answer == final.answer


def test_strategies_run_end_to_end(reasoner):
    for strategy in ("prune", "vote", "weighted-vote", "logprob"):
        res = reasoner.reason(
            "What is 2+3?", effort="low", seed=5, strategy=strategy, logprobs=True
        )
        assert res.strategy == strategy
        a, b = res.candidates
        higher_score = 0 if a.score >= b.score else 1
        only_b_answered = not a.answer.strip() and bool(b.answer.strip())
        only_a_answered = bool(a.answer.strip()) and not b.answer.strip()
        if strategy == "prune":  # k=2 keeps 2 alive: nothing pruned, the best score wins
            expected = higher_score
        elif strategy == "logprob":
            expected = 0 if a.mean_logprob >= b.mean_logprob else 1
        elif strategy == "vote":  # one vote each (or one class): ties go to the lowest index
            expected = 1 if only_b_answered else 0
        else:  # weighted: an empty answer never wins; otherwise the heavier score
            expected = 1 if only_b_answered else 0 if only_a_answered else higher_score
        assert res.chosen == expected, (strategy, a.answer, b.answer, a.score, b.score)


def test_reason_cli_json(tiny_gguf):
    out = cli_json(
        "reason",
        "--model",
        str(tiny_gguf("q8_0")),
        "--effort",
        "low",
        "--max-new-tokens",
        "20",
        "--seed",
        "1",
        "--json",
        "What is 1+1?",
    )
    for key in ("answer", "effort", "k", "chosen", "prompt_text", "candidates", "timings"):
        assert key in out
    assert out["k"] == len(out["candidates"]) == 2
    for c in out["candidates"]:
        assert set(c) >= {"text", "token_ids", "answer", "step_scores", "score", "tokens"}
        assert c["tokens"] == len(c["token_ids"])
    assert (out["timings"]["kv_layout"], out["timings"]["kv_type"]) == ("streams", "f16")


def test_reason_cli_kv_cache(tiny_gguf):
    """--kv-cache q8_0 runs the real engine with a q8_0 cache, and the timings say so."""
    args = ["--model", str(tiny_gguf("q8_0")), "--effort", "low", "--max-new-tokens", "12"]
    out = cli_json("reason", *args, "--kv-cache", "q8_0", "--json", "What is 1+1?")
    assert (out["timings"]["kv_layout"], out["timings"]["kv_type"]) == ("streams", "q8_0")
    assert len(out["candidates"]) == 2


def test_reason_cli_errors(tiny_gguf):
    proc = run_cli(
        "reason",
        "--model",
        str(tiny_gguf("q8_0")),
        "--effort",
        "auto",
        "--latency-budget",
        "0.02",
        "--max-new-tokens",
        "1000",
        "hi",
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    *calibrating, line = proc.stderr.strip().splitlines()  # a first calibration says so first
    assert ("fit" in line and "--allow-degrade" in line) or "ran out" in line, proc.stderr
    assert all(c.startswith("calibrat") for c in calibrating), proc.stderr
    for bad in ("nan", "inf", "-1"):
        proc = run_cli("reason", "--model", str(tiny_gguf("q8_0")), "--memory-budget", bad, "hi")
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "memory_budget must be a finite positive number" in proc.stderr
    proc = run_cli("reason", "--model", str(tiny_gguf("q8_0")), "--threads", "100000", "hi")
    assert proc.returncode == 1 and "threads must be between" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_reason_options_validate():
    from edge_metastone.errors import InvalidRequestError
    from edge_metastone.options import ReasonOptions

    assert ReasonOptions(effort="high", strategy="vote").effort.k == 32
    for bad in (
        {"effort": "extreme"},
        {"latency_budget": 0},
        {"memory_budget": -5},
        {"memory_budget": 1e308},  # finite, but no byte count
        {"max_new_tokens": 0},
        {"seed": -1},
        {"strategy": "beam"},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"stop": [""]},
        {"stop": [3]},
        {"seed": 1.5},
    ):
        with pytest.raises(InvalidRequestError):
            ReasonOptions(**bad)


def test_request_sampling_reaches_the_engine(reasoner):
    """Per-request temperature / top_p / stop override the reasoner's sampling for that request."""
    greedy = reasoner.reason("What is 2 + 2?", effort="low", seed=5, temperature=0)
    a, b = greedy.candidates
    assert a.token_ids == b.token_ids  # temperature 0: both candidates take the argmax
    hot = reasoner.reason("What is 2 + 2?", effort="low", seed=5)
    assert hot.candidates[0].token_ids != hot.candidates[1].token_ids  # the reasoner's T=1.0
    # a stop string from the greedy text: the candidate ends before it
    text = a.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = reasoner.reason("What is 2 + 2?", effort="low", seed=5, temperature=0, stop=[stop])
    c = cut.candidates[0]
    assert c.finish_reason == "stop" and stop not in c.text
    assert text.startswith(c.text) and len(c.text) <= text.index(stop)


def test_max_k_caps_what_auto_may_choose(reasoner):
    from edge_metastone.errors import InvalidRequestError

    big = {"effort": "auto", "latency_budget": 2.0, "max_new_tokens": 60}
    assert reasoner.plan(30, **big).effort.value == "high"  # as in test_auto_effort_uses_budgets
    assert reasoner.plan(30, **big, max_k=8).effort.value == "medium"
    assert reasoner.plan(30, **big, max_k=2).effort.value == "low"
    with pytest.raises(InvalidRequestError, match="max_k"):
        reasoner.plan(30, **big, max_k=1)
    with pytest.raises(InvalidRequestError, match="above max_k=8"):
        reasoner.reason("hi", effort="high", max_k=8)


def test_reason_rejects_unknown_fields(reasoner):
    from edge_metastone.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        reasoner.reason("hi", efort="low")


def test_calibration_measures_and_caches(tiny_gguf, private_cache):
    with Reasoner(tiny_gguf("q8_0"), sampling=STEPPY, max_new_tokens=16) as r:
        cal = r.calibration()
        assert r.calibration() is cal
    assert set(cal.step_seconds) == {1, 2, 4, 8, 16, 32}
    assert all(s > 0 for s in cal.step_seconds.values())
    assert all(a >= 0 for a in cal.attn_s_per_seq_cell.values())
    assert cal.prefill_tokens_per_s > 0 and cal.base_rss_bytes > 0
    assert (private_cache / "calibration" / f"{cal.key}.json").is_file()
    with Reasoner(tiny_gguf("q8_0"), sampling=STEPPY, max_new_tokens=16) as r2:
        assert r2.calibration() == cal  # read back from disk, not measured again


def test_abandoned_stream_stops_generating(tiny_gguf):
    """Closing the stream early unwinds the generation (the model is free again at once)."""
    import time

    no_end = SamplingSettings(temperature=1.0, logit_bias=((1000, -1e9), (1002, -1e9)))
    with Reasoner(tiny_gguf("q8_0"), sampling=no_end, calibration=CAL) as r:
        t0 = time.perf_counter()
        r.reason("Hi", effort="medium", max_new_tokens=300, seed=1)
        full = time.perf_counter() - t0  # 8 x 300 tokens, run to the end
        stream = r.reason_stream("Count.", effort="medium", max_new_tokens=3000, seed=9)
        assert isinstance(next(stream), TokenEvent)
        t0 = time.perf_counter()
        stream.close()
        res = r.reason("Hi", effort="low", max_new_tokens=5, seed=1)  # waits for the model lock
        waited = time.perf_counter() - t0
    assert res.k == 2
    # an uncancelled run would need ~10x `full` (3000 tokens) before the lock is free
    assert waited < 2 * full + 0.5, (waited, full)
