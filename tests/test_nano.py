"""MetaStone-nano: the task generator, the build scripts at toy size, and the shipped model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "examples" / "nano"))

from task import make_problem, problems, render, slip, slipped_steps, step_text


def evaluate_infix(text: str) -> int:
    """An independent evaluator: Python's own parser on the rendered expression."""
    return int(eval(text, {"__builtins__": {}}))


def test_problems_follow_the_task_definition():
    for p in problems(5, 300):
        assert evaluate_infix(render(p.tree)) == p.answer
        assert 2 <= len(p.ops) <= 5
        assert all(abs(r) <= 999 for *_, r in p.ops)
        # each step applies its operator to the values before it, in evaluation order
        for a, op, b, r in p.ops:
            assert r == (a + b if op == "+" else a - b if op == "-" else a * b)
        assert p.ops[-1][3] == p.answer
        assert render(p.tree) in p.prompt
        assert p.response().endswith(f"\\boxed{{{p.answer}}}.")


def test_steps_are_written_one_operation_per_delimiter():
    rng = random.Random(1)
    p = make_problem(rng)
    think = p.thinking()
    assert think.count(".\n\n") == len(p.ops)
    assert think.split(".\n\n")[0] == step_text(*p.ops[0])


def test_a_slip_is_carried_through_later_steps():
    rng = random.Random(2)
    for _ in range(200):
        p = make_problem(rng)
        at = rng.randrange(len(p.ops))
        wrong = slip(rng, p.ops[at][3])
        ops = slipped_steps(p.tree, at, wrong)
        assert wrong != p.ops[at][3] and ops[at][3] == wrong
        assert ops[:at] == p.ops[:at]
        for a, op, b, r in ops[at + 1 :]:
            assert r == (a + b if op == "+" else a - b if op == "-" else a * b)


@pytest.mark.slow
def test_build_scripts_run_at_toy_size(tmp_path):
    # bounded by the build's CPU time (1200 s), not the wall clock: on a loaded machine its
    # training steps take longer in wall time but not in CPU time
    from fuzz_models import cpu_seconds

    with subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "nano" / "build.py"), str(tmp_path), "--toy"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "build.err", "w"),
        cwd=REPO,
    ) as proc:
        while True:
            try:
                proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                used = cpu_seconds(proc.pid)
                if used is not None and used > 1200:
                    proc.kill()
                    pytest.fail(f"the toy build used {used:.0f} CPU seconds")
    assert proc.returncode == 0, (tmp_path / "build.err").read_text()[-2000:]
    from edge_metastone.modelfile.copy import provenance
    from edge_metastone.modelfile.read import open_model_file

    final = tmp_path / "default.gguf"
    mf = open_model_file(final)
    assert mf.head is not None and mf.policy_keys.default_strategy in (
        "best-of-k",
        "vote",
        "weighted-vote",
        "logprob",
    )
    prov = provenance(final)
    assert prov["name"] == "MetaStone-nano" and prov["sprm"]["loss"] == "spr"
    assert (tmp_path / "backbone" / "hf" / "tokenizer.json").is_file()


# --- the shipped model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Path:
    from edge_metastone.models import default_model_path

    return default_model_path()


def test_shipped_model_is_small_and_self_describing(shipped):
    from edge_metastone.modelfile.copy import provenance
    from edge_metastone.modelfile.read import open_model_file

    assert shipped.stat().st_size < 20 * 2**20
    mf = open_model_file(shipped)
    assert mf.head is not None and mf.step_token_ids and mf.think_start_id >= 0
    assert mf.policy_keys.default_strategy in ("best-of-k", "vote", "weighted-vote", "logprob")
    prov = provenance(shipped)
    assert (
        prov["script"] == "examples/nano/build.py"
        and prov["default_strategy"] == mf.policy_keys.default_strategy
    )


def test_reason_without_model_runs_the_embedded_model():
    proc = run_cli("reason", "What is (17+25)*3-40?")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].strip() != ""
    assert sum(1 for ln in lines if ln[2:].strip()[:1].isdigit()) >= 8  # one row per candidate


def test_shipped_model_really_reasons():
    """On fresh problems the shipped model is right far more often than chance, and scaling up
    the candidates does not hurt (bench/nano_eval.py measures the full picture)."""
    from edge_metastone.answers import answers_equivalent
    from edge_metastone.reasoner import Reasoner

    probs = problems(4242, 24)
    right = {"low": 0, "medium": 0}
    with Reasoner(max_new_tokens=160) as r:
        for effort in right:
            for i, p in enumerate(probs):
                res = r.reason(p.prompt, effort=effort, seed=i)
                right[effort] += answers_equivalent(res.answer, str(p.answer))
                if effort == "low":
                    assert "</think>" in res.candidates[res.chosen].text
    assert right["low"] >= 0.3 * len(probs), right
    assert right["medium"] >= right["low"] - 2, right


def test_prompt_outside_the_task_gets_an_answer_not_a_crash():
    proc = run_cli("reason", "--effort", "low", "--json", "Write a poem about the sea.")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["k"] == 2 and len(out["candidates"]) == 2
