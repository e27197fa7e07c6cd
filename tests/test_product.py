"""The product as a person meets it (issue 25): the scores shown mean what they seem to, the
embedded model says what it can do and warns outside it, and the sweep plot reads honestly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from edge_metastone.batch.report import plot_sweep, wilson
from edge_metastone.modelfile.about import about
from edge_metastone.models import default_model_path
from edge_metastone.models.arithmetic import MAX_NEW_TOKENS, outside_arithmetic
from edge_metastone.reasoner import Reasoner

REPO = Path(__file__).resolve().parent.parent
PROMPT = "What is (58+27)*4-96?"  # seed 1, T 0.6: one candidate slips at 85*4, seven do not


def test_the_embedded_models_provenance_says_its_head_is_uninformative_and_its_task():
    a = about(default_model_path())
    assert a.name == "MetaStone-nano"
    assert not a.head_informative  # within-problem AUC 0.59 recorded at build time
    assert a.sprm_label == "SPRM (not informative on this model)"
    assert a.to_json()["step_signal"] == "confidence"
    assert "operands of one or two digits" in a.task.domain


@pytest.mark.parametrize(
    ("prompt", "inside"),
    [
        ("What is (17+25)*3-40?", True),
        ("Compute 5*(3+4).", True),
        ("12-3*4 = ?", True),
        ("What is the capital of France?", False),
        ("", False),
        ("What is 56/7+3?", False),
        ("What is 123+4-5?", False),  # a three-digit operand
        ("What is 99*99-1?", False),  # an intermediate beyond 999
        ("What is 2+3?", False),  # one operation
    ],
)
def test_the_arithmetic_task_check(prompt, inside):
    assert (outside_arithmetic(prompt) is None) == inside


def test_candidates_carry_the_models_own_step_confidence():
    with Reasoner() as r:
        result = r.reason(PROMPT, seed=1)
    assert result.strategy == "logprob"
    for c in result.candidates:
        assert len(c.step_confidence) == len(c.step_scores) > 0
        assert all(0.0 < x <= 1.0 for x in c.step_confidence)
    # the slipped step is the least sure step of all, where the SPRM scores every candidate ~0
    second = [re.search(r"85\*4=(\d+)", c.text) for c in result.candidates]
    slipped = [
        c for c, m in zip(result.candidates, second, strict=True) if m and m.group(1) != "340"
    ]
    right = [c for c, m in zip(result.candidates, second, strict=True) if m and m.group(1) == "340"]
    assert slipped and right
    assert max(c.step_confidence[1] for c in slipped) < min(c.step_confidence[1] for c in right)


def test_the_embedded_models_answers_stop_at_its_own_length():
    with Reasoner() as r:
        assert r.max_new_tokens == MAX_NEW_TOKENS == 160
    with Reasoner(max_new_tokens=64) as r:
        assert r.max_new_tokens == 64


def test_reason_shows_the_signal_that_decides_and_labels_the_sprm():
    p = run_cli("reason", PROMPT, "--seed", "1")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "least-sure" in out and "log-prob" in out
    assert "chosen by logprob: mean token log-prob" in out
    assert "SPRM*: SPRM (not informative on this model)" in out
    # a geometric mean with a step at the 1e-10 floor is not shown as a number
    assert "1e-05" not in out and "~0" in out
    assert p.stderr == ""  # an arithmetic prompt: no warning


def test_reason_warns_outside_the_task_and_still_answers():
    p = run_cli("reason", "What is the capital of France?", "--json", "--effort", "low")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["answer"] != ""  # it still answers
    assert len(d["warnings"]) == 1 and "outside what MetaStone-nano can do" in d["warnings"][0]
    assert p.stderr.startswith("warning: the prompt is outside")
    inside = run_cli("reason", "What is (17+25)*3-40?", "--json", "--effort", "low")
    assert json.loads(inside.stdout)["warnings"] == []


def test_reason_help_and_inspect_state_the_domain():
    help_text = " ".join(run_cli("reason", "--help").stdout.split())
    assert "operands of one or two digits" in help_text
    p = run_cli("inspect", str(default_model_path()))
    assert p.returncode == 0, p.stderr
    assert "can do: integer arithmetic" in p.stdout
    assert "not informative on this model" in p.stdout


def test_score_uses_the_embedded_model_and_says_what_plain_text_needs(tmp_path):
    text = tmp_path / "answer.txt"
    text.write_text("2*3=6.\n\n1+6=7.\n\n</think>\n\nThe answer is \\boxed{7}.", encoding="utf-8")
    plain = run_cli("score", "--text-file", str(text), "--json")
    assert plain.returncode == 0, plain.stderr
    assert "pass --prompt QUESTION" in plain.stderr
    assert json.loads(plain.stdout)["warnings"]
    wrapped = run_cli("score", "--text-file", str(text), "--prompt", "What is 1+2*3?", "--json")
    assert wrapped.returncode == 0, wrapped.stderr
    d = json.loads(wrapped.stdout)
    assert d["warnings"] == [] and len(d["positions"]) == 2
    assert d["positions"][0] > json.loads(plain.stdout)["positions"][0]  # after the template
    person = run_cli("score", "--text-file", str(text))
    assert "not a measurement" in person.stdout  # a step at the floor: ~0, not 1e-05
    assert "SPRM (not informative on this model)" in person.stdout


def test_the_sweep_plot_spans_0_to_1_with_intervals_and_labels_inside(tmp_path):
    def point(k, compute, acc):
        return {
            "k": k,
            "problems": 9,
            "compute": compute,
            "default": acc,
            "default_strategy": "logprob",
            "best-of-k": acc,
            "vote": acc,
            "logprob": acc,
            "single": 0.6,
            "oracle": 0.9,
        }

    points = {
        "low": point(2, 1e9, 0.667),
        "medium": point(8, 4e9, 0.652),
        "high": point(32, 1.6e10, 0.667),
    }
    png = tmp_path / "sweep.png"
    facts = plot_sweep(points, {}, png, "9 problems")
    assert png.stat().st_size > 0
    assert facts["ylim"] == (0.0, 1.0)
    lo, hi = facts["xlim"]
    assert all(lo * 2 < x < hi / 2 for x in facts["labels"])  # the mode labels sit inside
    low, high = wilson(6 / 9, 9)
    assert 0.3 < low < 0.4 and 0.85 < high < 0.9
