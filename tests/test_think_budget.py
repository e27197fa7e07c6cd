"""The thinking budget: after N tokens inside its think window a candidate's thought is ended
for it (an optional message, then `</think>`), recorded per candidate; a budget the thought never
reaches changes nothing; a model without think markup refuses a budget in one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from edge_metastone.errors import InvalidRequestError
from edge_metastone.options import ReasonOptions
from edge_metastone.reasoner import Reasoner
from edge_metastone.server.app import ServerSettings, create_app

Q = "What is (17+25)*3-40?"


def test_the_budget_ends_each_thought_after_n_tokens(nano_api):
    think_end = nano_api.backend.rule.think_end_id
    for budget in (0, 3, 7):
        res = nano_api.reason(Q, ReasonOptions(effort="low", seed=2, think_budget=budget))
        for c in res.candidates:
            assert c.thought_ended
            # the prompt opens the thought: its first `budget` tokens are the model's, then </think>
            assert c.token_ids[budget] == think_end
            assert think_end not in c.token_ids[:budget]
    free = nano_api.reason(Q, ReasonOptions(effort="low", seed=2))
    roomy = nano_api.reason(Q, ReasonOptions(effort="low", seed=2, think_budget=1000))
    assert [c.token_ids for c in roomy.candidates] == [c.token_ids for c in free.candidates]
    assert not any(c.thought_ended for c in roomy.candidates)
    assert all(c["thought_ended"] is False for c in roomy.to_json()["candidates"])


def test_the_message_is_written_before_the_end_of_thought(nano_api):
    msg = " Time is up."
    ids = nano_api.backend.tokenize_text(msg)
    res = nano_api.reason(
        Q, ReasonOptions(effort="low", seed=4, think_budget=5, think_budget_message=msg)
    )
    end = nano_api.backend.rule.think_end_id
    for c in res.candidates:
        assert c.token_ids[5 : 5 + len(ids) + 1] == [*ids, end]
        assert msg + "</think>" in c.text


def test_refused_without_think_markup():
    from real_model import smollm2_gguf

    path = smollm2_gguf(install=False)
    with Reasoner(path, n_threads=2) as r:
        with pytest.raises(InvalidRequestError, match="think"):
            r.reason("hi", ReasonOptions(effort="low", max_new_tokens=4, think_budget=3))
        with pytest.raises(InvalidRequestError, match="think-budget"):
            create_app(r, settings=ServerSettings(think_budget=3))
    cli = [sys.executable, "-m", "edge_metastone", "reason", "--model", str(path)]
    out = subprocess.run(
        [*cli, "--think-budget", "3", "--max-new-tokens", "4", "hi"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "<think>" in out.stderr
    with pytest.raises(InvalidRequestError, match="think_budget"):
        ReasonOptions(think_budget=-1)


def test_the_server_takes_thinking_budget_tokens(nano_api):
    with TestClient(create_app(nano_api), base_url="http://127.0.0.1") as http:
        body = {
            "messages": [{"role": "user", "content": Q}],
            "effort": "low",
            "seed": 1,
            "thinking_budget_tokens": 4,
        }
        resp = http.post("/v1/chat/completions", json=body).json()
        assert all(c["thought_ended"] for c in resp["metastone"]["candidates"])
        bad = http.post("/v1/chat/completions", json={**body, "thinking_budget_tokens": -2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "thinking_budget_tokens"


def test_batch_records_the_budget_and_each_cut_thought(tmp_path):
    from conftest import run_cli

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "What is (17+25)*3-40?", "answer": "86"}\n')
    out = tmp_path / "out.jsonl"
    args = ("--effort", "low", "--think-budget", "3", "--max-new-tokens", "64", "--no-progress")
    proc = run_cli("batch", str(inp), "-o", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    import json

    rec = json.loads(out.read_text())
    assert rec["think_budget"] == 3
    assert [c.get("thought_ended") for c in rec["candidates"]] == [True, True]
