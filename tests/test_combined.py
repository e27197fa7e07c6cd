"""The combined selector (head + log-probability): its features, strategies on hand-built
candidates with known answers, its fit, and the recorded default reaching the Reasoner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fake_backend import FakeBackend, Script

from edge_metastone.errors import InvalidRequestError
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import Calibration
from edge_metastone.search import make_strategy
from edge_metastone.search.base import StrategyName
from edge_metastone.search.combined import (
    FEATURES,
    LOGIT_CLIP,
    Combined,
    Selector,
    candidate_features,
    generated_step_scores,
    step_logit,
)
from edge_metastone.training.metrics import ProblemSamples
from edge_metastone.training.selector_fit import MEASURED, fit_logistic, fit_selector
from edge_metastone.types import Candidate, FinishReason

# z = log-odds of the mean step + 2 x mean token log-probability
SEL = Selector({"sprm_mean": 1.0, "logprob_mean": 2.0})
CAL = Calibration({1: 0.01, 8: 0.015, 32: 0.03}, 2000.0, 200 << 20, 2)


def cand(i: int, answer: str, steps: list[float], lp: float, **kw) -> Candidate:
    n = kw.pop("n", 4)
    return Candidate(
        i, [1] * n, f"so x = {answer}", [], steps, None, kw.pop("reason", FinishReason.EOS),
        lp, token_logprobs=[lp] * n, **kw,
    )  # fmt: skip


# By hand: z0 = z1 = 0 + 2(-0.25) = -0.5; z2 = ln 9 + 2(-0.5) = 1.197; z3 = ln(1/4) + 2(-0.1) =
# -1.586; z4 = 0 + 2(-0.2) = -0.4. Argmax: 2 ("8"). Vote by sigmoid(z): "7" has 0.378 + 0.378 +
# 0.401 = 1.156, "8" 0.768, "9" 0.170: "7", its heaviest member 4.
KNOWN = [
    cand(0, "7", [0.5], -0.25),
    cand(1, "7", [0.5], -0.25),
    cand(2, "8", [0.9], -0.5),
    cand(3, "9", [0.2], -0.1),
    cand(4, "7", [0.5], -0.2),
]


def test_step_logit_and_features_by_hand():
    assert step_logit(0.5) == 0.0 and step_logit(0.9) == pytest.approx(math.log(9))
    assert step_logit(0.0) == -LOGIT_CLIP and step_logit(1.0) == LOGIT_CLIP
    c = Candidate(0, [1] * 4, "1", [], [0.5, 0.9], None, FinishReason.EOS, -1.0,
                  token_logprobs=[-1.0, -3.0, -0.5, -0.5])  # fmt: skip
    f = Selector(SEL.weights, window=2)
    feats = candidate_features(c, f.window)
    assert feats == pytest.approx({
        "sprm_mean": math.log(9) / 2, "sprm_min": 0.0, "logprob_mean": -1.25,
        "logprob_lowest": -2.0,  # the window (-1, -3)
    })  # fmt: skip
    empty = candidate_features(Candidate(1, [], "", [], [], None, FinishReason.EOS))
    assert empty["sprm_mean"] == -LOGIT_CLIP and empty["logprob_mean"] == -20.0


def test_prompt_steps_are_left_out():
    """A step in the prompt has no step confidence (log-probabilities on): not the candidate's."""
    c = cand(0, "1", [0.99, 0.2, 0.4], -1.0, step_confidence=[None, 0.7, 0.6])
    assert generated_step_scores(c) == [0.2, 0.4]
    assert generated_step_scores(cand(0, "1", [0.99, 0.2], -1.0)) == [0.99, 0.2]  # none known


def test_combined_picks_the_known_candidate():
    assert Combined(selector=SEL).select(None, KNOWN, 5)[0] == 2
    assert Combined(vote=True, selector=SEL).select(None, KNOWN, 5)[0] == 4
    assert SEL.probability(KNOWN[2]) == pytest.approx(1 / (1 + math.exp(1.0 - math.log(9))))


def test_combined_skips_truncated_and_pruned():
    cands = [*KNOWN[:2], cand(2, "8", [0.9], -0.5, reason=FinishReason.LENGTH), *KNOWN[3:]]
    assert Combined(selector=SEL).select(None, cands, 5)[0] == 4  # z4 -0.4 is then the highest


def test_selector_json_round_trip_and_bad_values():
    s = Selector({"sprm_min": 0.5, "logprob_lowest": 1.5}, -0.3, 8, {"problems": 3})
    d = json.loads(s.to_json())
    assert d["version"] == 1 and d["features"] == list(FEATURES) and d["window"] == 8
    assert d["weights"] == {"sprm_mean": 0.0, "sprm_min": 0.5, "logprob_mean": 0.0,
                            "logprob_lowest": 1.5}  # fmt: skip
    back = Selector.from_json(s.to_json())
    assert back == s and back.measured == {"problems": 3}
    bad_values = [
        '{"version": 2, "weights": {}}',
        '{"version": 1}',
        "not json",
        '{"version": 1, "weights": {"nope": 1}}',
        '{"version": 1, "weights": {"sprm_min": NaN}}',
    ]
    for bad in bad_values:
        assert Selector.from_json(bad) is None, bad
    assert Selector.from_json(None) is None and Selector.from_json("") is None


def scripts() -> list[Script]:
    """The KNOWN candidates as scripted ones (one step each; the fake records no step
    confidence, so every step counts)."""
    spec = [([0.5], "7", -0.25), ([0.5], "7", -0.25), ([0.9], "8", -0.5), ([0.2], "9", -0.1),
            ([0.5], "7", -0.2)]  # fmt: skip
    return [Script(s, f"x = {a}", logprob=lp) for s, a, lp in spec]


def test_recorded_default_reaches_the_reasoner():
    fake = FakeBackend(scripts(), default_strategy="combined-vote")
    fake.selector = SEL.to_json()
    with Reasoner(backend=fake, calibration=CAL) as r:
        assert r.default_strategy is StrategyName.COMBINED_VOTE
        res = r.reason("What is 2+3?", effort="low", max_new_tokens=100)
        assert res.strategy == "combined-vote" and res.k == 2
        # k=8 cycles the five scripts: 7 has 4 x 0.378 + 0.401, 8 has 2 x 0.768: "7", member 4
        res = r.reason("What is 2+3?", effort="medium", max_new_tokens=100)
        assert (res.strategy, res.chosen, res.answer) == ("combined-vote", 4, "7")
        res = r.reason("What is 2+3?", effort="medium", strategy="combined", max_new_tokens=100)
        assert (res.chosen, res.answer) == (2, "8")
    assert all(s.logprobs for s in fake.settings_seen)


def test_without_a_selector_the_default_falls_back_and_a_request_is_refused():
    fake = FakeBackend(scripts(), default_strategy="combined")
    with Reasoner(backend=fake, calibration=CAL) as r:
        assert r.default_strategy is StrategyName.BEST_OF_K
        with pytest.raises(InvalidRequestError, match=r"metastone\.selector") as e:
            r.reason("What is 2+3?", effort="low", strategy="combined-vote")
        assert e.value.param == "strategy"
    assert fake.calls == 0  # refused before any token
    fake = FakeBackend(scripts(), has_head=False, default_strategy="combined-vote")
    fake.selector = SEL.to_json()
    with Reasoner(backend=fake, calibration=CAL) as r:
        assert r.default_strategy is StrategyName.LOGPROB  # no head: nothing to combine
    assert make_strategy("combined-vote").name is StrategyName.COMBINED_VOTE


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2)) * [1.0, 3.0] + [0.5, -2.0]
    z = 0.7 + 1.5 * x[:, 0] - 0.4 * x[:, 1]
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-z))).astype(float)
    w, b = fit_logistic(x, y, l2=1e-6)
    assert np.allclose(w, [1.5, -0.4], atol=0.06) and b == pytest.approx(0.7, abs=0.08), (w, b)
    w, b = fit_logistic(x, np.ones(len(x)))  # one class: finite, the bias takes it
    assert np.isfinite(w).all() and b > 3


def synthetic(n: int, seed: int) -> list[ProblemSamples]:
    """Problems of 8 candidates whose rightness the log-probability tells and the head does not."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ok = rng.random(8) < 0.4
        lp = np.where(ok, -0.3, -0.8) + rng.normal(0, 0.1, 8)
        steps = [[float(rng.uniform(0.2, 0.8))] for _ in range(8)]
        answers = ["5" if r else str(rng.integers(6, 9)) for r in ok]
        lps = [[float(v)] * 5 for v in lp]
        scores = [s[0] for s in steps]
        out.append(ProblemSamples(answers, list(map(bool, ok)), scores, list(lp), steps, lps))
    return out


def test_fit_selector_measures_and_chooses():
    sel, best = fit_selector(synthetic(60, 1), seed=0)
    m = sel.measured
    assert m["problems"] == 60 and m["candidates"] == 480 and m["folds"] == 5
    assert m["auc_within"]["logprob"] > 0.95 and m["auc_within"]["combined"] > 0.95
    assert 0.3 < m["auc_within"]["head"] < 0.7
    acc = m["accuracy"]
    assert set(acc) == {"one_sample", "vote", "logprob", "best-of-k", "weighted-vote", "combined",
                        "combined-vote", "oracle"}  # fmt: skip
    assert acc["combined"] > acc["best-of-k"] and acc["oracle"] >= acc["combined"]
    assert m["default_strategy"] == best.value
    assert acc[best.value] == max(acc[k.value] for k in MEASURED)
    assert sel.weights["logprob_mean"] > 1 and Selector.from_json(sel.to_json()) == sel
