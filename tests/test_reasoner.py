"""The Reasoner API and `reason` CLI on the tiny fixture (real llama.cpp); the strategies end to
end on hand-built candidates (the scripted fake backend)."""

from __future__ import annotations

import pytest
from fake_backend import FakeBackend, Script

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


def _boxed(answer: int) -> str:
    return f"</think> \\boxed{{{answer}}}"


# Hand-built candidates, each strategy's choice known in advance (k=8, effort medium; one step
# every 10 tokens; max_new_tokens=100). The traps: 0 ends its turn at once with the best possible
# mean log-probability (0.0); 6 has the next best (-0.05) but is cut at 100 tokens, and its running
# score is far behind the leaders at its third step.
#            steps (SPRM)              text                   mean log-prob
KNOWN = [
    Script([], "", logprob=0.0),  # 0: empty
    Script([0.3, 0.3], _boxed(7), logprob=-0.6),  # 1
    Script([0.95, 0.9, 0.9, 0.9], _boxed(8), logprob=-1.5),  # 2: the best SPRM score
    Script([0.4, 0.4], _boxed(9), logprob=-0.2),  # 3: the best log-prob that finished well
    Script([0.35, 0.3], _boxed(7), logprob=-0.5),  # 4
    Script([0.9, 0.85, 0.85, 0.85], _boxed(8), logprob=-1.6),  # 5
    Script([0.1] * 20, "x" * 40 + _boxed(9), logprob=-0.05),  # 6: truncated (200 tokens)
    Script([0.2, 0.2], _boxed(7), logprob=-0.7),  # 7
]


@pytest.mark.parametrize(
    ("strategy", "chosen", "answer"),
    [
        ("best-of-k", 2, "8"),  # geometric means: 2 0.912 > 5 0.862 > 3 0.4
        ("prune", 2, "8"),  # 6 pruned at its 3rd step (0.1 < 0.6 x 0.912); 2 still best
        ("vote", 1, "7"),  # 7 has three votes (1, 4, 7), 8 two, 9 one; its first member
        ("weighted-vote", 2, "8"),  # by score: 8 1.77 > 7 0.82 > 9 0.4 (+ 6's 0.1); heaviest 2
        ("logprob", 3, "9"),  # not 0 (empty) nor 6 (truncated), though both rank higher
        # weights exp(lp - top) among those that finished well: 7 has 0.67+0.74+0.61 = 2.02,
        # 9 has 1.0, 8 has 0.27+0.25; the heaviest member of 7 is 4 (-0.5)
        ("confidence-vote", 4, "7"),
    ],
)
def test_strategies_choose_the_known_candidate_end_to_end(strategy, chosen, answer):
    """Each strategy through the whole Reasoner on hand-built candidates, against its expected
    choice written down by hand (not recomputed with the code's own rules)."""
    fake = FakeBackend(KNOWN)
    with Reasoner(backend=fake, calibration=CAL) as r:
        res = r.reason("What is 2+3?", effort="medium", strategy=strategy, max_new_tokens=100)
    assert res.strategy == strategy and res.k == 8
    assert (res.chosen, res.answer) == (chosen, answer), res.candidates[res.chosen]
    ends = [c.finish_reason for c in res.candidates]
    assert ends[0] == "eos" and res.candidates[0].tokens == 0
    if strategy == "prune":
        assert ends[6] == "pruned" and res.candidates[6].tokens == 30
        assert ends.count("pruned") == 1
    else:
        assert ends[6] == "length" and res.candidates[6].tokens == 100
        assert ends.count("eos") == 7


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
    # what each cost is, derived from known step times, is checked exactly in test_calibration
    # (test_the_derived_costs_are_the_machines_own); here: a real measurement, and its cache
    assert set(cal.step_seconds) == {1, 2, 4, 8, 16, 32}
    assert set(cal.attn_s_per_seq_cell) == {1, 8, 32}
    assert all(s > 0 for s in cal.step_seconds.values()) and cal.base_rss_bytes > 0
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
