"""What a batch job records as its options (`OUT.options.json`): the token limit the run uses, so a
run without --max-new-tokens records the model's own limit (not a 1,024 it never used), and a rerun
naming that same limit resumes it."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli
from edge_metastone.batch.job import BatchJob
from edge_metastone.modelfile.about import model_max_new_tokens
from edge_metastone.models import default_model_path
from edge_metastone.models.arithmetic import MAX_NEW_TOKENS
from edge_metastone.options import ReasonOptions


def _job(tmp_path: Path, **options) -> BatchJob:
    return BatchJob(tmp_path / "in.jsonl", tmp_path / "out.jsonl", ReasonOptions(**options))


def test_identity_records_the_models_own_token_limit_when_none_is_given(tmp_path):
    recorded = _job(tmp_path).identity("0" * 64)["options"]["max_new_tokens"]
    # what the Reasoner runs the embedded model with: its task's limit, 160, not 1024
    assert recorded == model_max_new_tokens(default_model_path()) == MAX_NEW_TOKENS == 160


def test_identity_without_a_limit_equals_the_one_naming_the_same_limit(tmp_path):
    digest = "0" * 64
    implicit = _job(tmp_path).identity(digest)
    assert implicit == _job(tmp_path, max_new_tokens=MAX_NEW_TOKENS).identity(digest)
    assert implicit != _job(tmp_path, max_new_tokens=96).identity(digest)


def test_a_run_without_max_new_tokens_resumes_with_the_limit_it_used(tmp_path):
    inp = tmp_path / "in.jsonl"
    prompts = ("What is 3+4*2?", "What is (12-5)*3?")
    lines = [json.dumps({"id": f"q{i}", "prompt": p}) for i, p in enumerate(prompts)]
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    common = ("batch", str(inp), "-o", str(out), "--effort", "low", "--threads", "1")
    first = run_cli(*common, "--no-progress")
    assert first.returncode == 0, first.stderr
    options = json.loads((tmp_path / "out.options.json").read_text(encoding="utf-8"))
    assert options["options"]["max_new_tokens"] == MAX_NEW_TOKENS
    records = out.read_text(encoding="utf-8")
    again = run_cli(*common, "--no-progress", "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert again.returncode == 0, again.stderr  # the same limit: the same job, nothing to redo
    assert out.read_text(encoding="utf-8") == records
