"""batch: kill-and-resume (SIGKILL at random points), a half-written last line, bad lines, duplicate
ids, options mismatch, messages, records equal to `Reasoner.reason` itself, Ray equal to the local
run, the missing-Ray message, and the sweep's plot. Runs the embedded MetaStone-nano (real
llama.cpp), which answers its arithmetic often enough for correctness to mean something."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from edge_metastone.batch.jobfile import record_seed
from edge_metastone.options import ReasonOptions
from edge_metastone.reasoner import Reasoner

sys.path.insert(0, str(REPO / "examples" / "nano"))

from task import problems

# one problem at a time: records exactly reproducible whatever ran beside them (a window of
# problems batched together can round differently: test_a_window_batches_problems_in_order)
COMMON = ("--max-new-tokens", "96", "--threads", "1", "--no-progress", "--window", "1")


def write_input(path: Path, n: int, seed: int = 5, extra: list[str] | None = None) -> Path:
    """`n` nano problems with gold answers, then `extra` raw lines."""
    lines = [
        json.dumps({"id": f"q{i}", "prompt": p.prompt, "answer": p.answer})
        for i, p in enumerate(problems(seed, n))
    ]
    path.write_text("\n".join(lines + (extra or [])) + "\n", encoding="utf-8")
    return path


def read_records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a half-written last line"
    return [json.loads(line) for line in data.decode().splitlines()]


def stable(records: list[dict]) -> list[dict]:
    """Records without their wall-clock time (the one field that may differ between runs)."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def batch(inp: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("batch", str(inp), "-o", str(out), *COMMON, *args)


def reference_run(tmp_path_factory, n: int) -> tuple[Path, Path, list[dict]]:
    """An uninterrupted local run over `n` problems at low effort: (input, output, records)."""
    d = tmp_path_factory.mktemp("clean")
    inp = write_input(d / "in.jsonl", n)
    out = d / "out.jsonl"
    proc = batch(inp, out, "--effort", "low")
    assert proc.returncode == 0, proc.stderr
    return inp, out, read_records(out)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted run over 60 problems at low effort: the reference."""
    return reference_run(tmp_path_factory, 60)


def copy_output(src: Path, dst: Path, n: int) -> None:
    """The first `n` records of a finished output, with its options: a run killed after `n`."""
    dst.write_bytes(b"".join(src.read_bytes().splitlines(keepends=True)[:n]))
    opts = lambda p: p.with_name(p.stem + ".options.json")  # noqa: E731
    opts(dst).write_bytes(opts(src).read_bytes())


# --- crash safety -----------------------------------------------------------------------------


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(clean_run, tmp_path):
    inp, _, clean = clean_run
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "edge_metastone", "batch", str(inp), "-o", str(out), *COMMON]
    cmd += ["--effort", "low"]
    rng = random.Random(11)
    targets = sorted(rng.sample(range(3, len(clean) - 5), 4))  # records written before each kill
    kills, lines_at_kill = 0, []
    for target in targets:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while (not out.exists() or out.read_bytes().count(b"\n") < target) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.03))  # then a random moment inside the next record
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        lines_at_kill.append(out.read_bytes().count(b"\n"))
    assert kills == 4 and lines_at_kill[-1] < len(clean), "the run finished before it was killed"
    assert lines_at_kill == sorted(lines_at_kill)  # every run moved forward, none started over
    proc = batch(inp, out, "--effort", "low")
    assert proc.returncode == 0, proc.stderr
    assert f"resumed after {lines_at_kill[-1]}" in proc.stdout
    records = read_records(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(clean) and len(set(ids)) == len(ids)  # 0 lost, 0 duplicated
    assert stable(records) == stable(clean)
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["records"] == len(clean) and summary["modes"]["low"]["records"] == len(clean)


def test_a_window_batches_problems_in_order_and_resumes_exactly_once(clean_run, tmp_path):
    """--window 8: eight problems in flight in one model, records still in input order, each id
    exactly once, and a SIGKILLed run resumes where it stopped. The answers agree with the
    one-at-a-time run except where batching rounds a close choice the other way."""
    inp, _, clean = clean_run
    out = tmp_path / "out.jsonl"
    args = ["--max-new-tokens", "96", "--threads", "1", "--no-progress", "--window", "8"]
    cmd = [sys.executable, "-m", "edge_metastone", "batch", str(inp), "-o", str(out), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([*cmd, "--effort", "low"], env=env, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not out.exists() or out.read_bytes().count(b"\n") < 12) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = out.read_bytes().count(b"\n")
    assert killed_at < len(clean), "the run finished before it was killed"
    done = run_cli("batch", str(inp), "-o", str(out), *args, "--effort", "low")
    assert done.returncode == 0, done.stderr
    assert f"resumed after {killed_at}" in done.stdout
    records = read_records(out)
    assert [r["id"] for r in records] == [r["id"] for r in clean]  # in order, exactly once
    assert [r["line"] for r in records] == [r["line"] for r in clean]
    same = sum(a["answer"] == b["answer"] for a, b in zip(records, clean, strict=True))
    assert same >= 0.8 * len(clean), f"only {same} of {len(clean)} answers agree"


def test_half_written_last_line_is_cut_and_redone(clean_run, tmp_path):
    inp, clean_out, clean = clean_run
    out = tmp_path / "out.jsonl"
    copy_output(clean_out, out, 20)
    line21 = clean_out.read_bytes().splitlines()[20]
    with out.open("ab") as f:  # what a crash in the middle of a write leaves
        f.write(line21[: len(line21) // 2])
    proc = batch(inp, out, "--effort", "low")
    assert proc.returncode == 0, proc.stderr
    assert "resumed after 20" in proc.stdout
    assert stable(read_records(out)) == stable(clean)


def test_result_depends_on_the_id_not_the_position(clean_run, tmp_path):
    inp, _, clean = clean_run
    lines = inp.read_text().splitlines()[:8]
    shuffled = tmp_path / "in.jsonl"
    shuffled.write_text("\n".join(reversed(lines)) + "\n")
    out = tmp_path / "out.jsonl"
    assert batch(shuffled, out, "--effort", "low").returncode == 0
    by_id = {r["id"]: r for r in stable(clean)}
    for r in stable(read_records(out)):
        assert {**r, "line": 0} == {**by_id[r["id"]], "line": 0}


# --- input and options ------------------------------------------------------------------------


def test_bad_lines_get_error_records_and_the_job_goes_on(tmp_path):
    extra = [
        "{not json",
        json.dumps({"id": "np", "answer": 3}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "bm", "messages": [{"role": "user"}]}),
        json.dumps({"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
        json.dumps({"id": True, "prompt": "What is 1+1?"}),
        "",  # blank lines are not records
        json.dumps({"id": "last", "prompt": "What is 2+3*4?", "answer": "14"}),
    ]
    inp = write_input(tmp_path / "in.jsonl", 2, extra=extra)
    with inp.open("ab") as f:
        f.write(b'{"id": "latin1", "prompt": "caf\xe9"}\n')
    proc = batch(inp, tmp_path / "out.jsonl", "--effort", "low")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    recs = read_records(tmp_path / "out.jsonl")
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert sorted(errors) == [3, 4, 5, 6, 7, 8, 11]
    assert "not JSON" in errors[3] and "no prompt" in errors[4]
    assert "not a JSON object" in errors[5] and "role" in errors[6]
    assert "not both" in errors[7] and "'id'" in errors[8] and "UTF-8" in errors[11]
    good = [r for r in recs if "error" not in r]
    assert [r["id"] for r in good] == ["q0", "q1", "last"]
    assert all(r["answer"] and len(r["candidates"]) == 2 for r in good)
    assert "7 errors" in proc.stdout


def test_duplicate_ids_are_refused_up_front(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 3, extra=[json.dumps({"id": "q1", "prompt": "hi"})])
    proc = batch(inp, tmp_path / "out.jsonl")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert 'in.jsonl:4: duplicate id "q1" (first on line 2)' in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_unusable_paths_and_flags_are_one_line_errors(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 1)
    for args, what in (
        ((str(inp), "-o", str(tmp_path / "no" / "out.jsonl")), "cannot write"),
        ((str(tmp_path), "-o", str(tmp_path / "out.jsonl")), "cannot read"),
        ((str(inp), "-o", str(inp)), "must not be the input"),
        (
            (str(inp), "-o", str(tmp_path / "o.jsonl"), "--effort", "low", "--sweep", "low"),
            "not both",
        ),
        ((str(inp), "-o", str(tmp_path / "o.jsonl"), "--workers", "2"), "give --ray"),
    ):
        proc = run_cli("batch", *args)
        assert proc.returncode == 1 and what in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_a_rerun_with_other_options_is_refused(tmp_path):
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "out.jsonl"
    assert batch(inp, out, "--effort", "low").returncode == 0
    before = out.read_bytes()
    for args, what in (
        (("--effort", "low", "--seed", "1"), "options.seed: 0 -> 1"),
        (("--effort", "medium"), "modes"),
        (("--effort", "low", "--strategy", "vote"), "options.strategy"),
    ):
        proc = batch(inp, out, *args)
        assert proc.returncode == 1 and what in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    with inp.open("a") as f:  # the input changed
        f.write(json.dumps({"id": "new", "prompt": "What is 1+2?"}) + "\n")
    proc = batch(inp, out, "--effort", "low")
    assert proc.returncode == 1 and "input_sha256" in proc.stderr
    assert out.read_bytes() == before
    stranger = tmp_path / "notes.jsonl"
    stranger.write_text('{"a": 1}\n')
    proc = batch(inp, stranger, "--effort", "low")
    assert proc.returncode == 1 and "not a batch output" in proc.stderr
    assert stranger.read_text() == '{"a": 1}\n'


def test_records_are_what_the_reasoner_returns_for_prompts_and_messages(tmp_path):
    question = "What is (17+25)*3-40?"
    lines = [
        json.dumps({"id": "p", "prompt": question, "answer": "86"}),
        json.dumps({"id": 7, "messages": [{"role": "user", "content": question}], "answer": 86}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = batch(inp, out, "--effort", "medium", "--full")
    assert proc.returncode == 0, proc.stderr
    recs = read_records(out)
    with Reasoner(None, n_threads=1) as r:
        for rec, prompt in zip(
            recs, (question, [{"role": "user", "content": question}]), strict=True
        ):
            seed = record_seed(0, rec["id"])
            res = r.reason(prompt, ReasonOptions(effort="medium", seed=seed, max_new_tokens=96))
            assert rec["seed"] == seed and rec["k"] == 8 and rec["chosen"] == res.chosen
            assert rec["answer"] == res.answer and rec["prompt_text"] == res.prompt_text
            assert [c["token_ids"] for c in rec["candidates"]] == [
                c.token_ids for c in res.candidates
            ]
            assert [c["score"] for c in rec["candidates"]] == [c.score for c in res.candidates]
            assert rec["correct"] == (res.answer == "86")
            assert rec["tokens"] == sum(c.tokens for c in res.candidates)
    assert recs[0]["prompt_text"] == recs[1]["prompt_text"]  # a prompt is one user message


def test_a_prompt_outside_the_task_gets_the_warning_reason_prints(tmp_path):
    """A record carries what `reason --json` warns of for its prompt (here a question outside the
    embedded model's arithmetic), and a prompt inside the task gets no `warnings` at all."""
    off, inside = "What is the capital of France?", "What is (17+25)*3-40?"
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate([off, inside]))
    )
    out = tmp_path / "out.jsonl"
    proc = batch(inp, out, "--effort", "low")
    assert proc.returncode == 0, proc.stderr
    first, second = read_records(out)
    said = run_cli("reason", off, "--json", "--effort", "low")
    assert said.returncode == 0, said.stderr
    warned = json.loads(said.stdout)["warnings"]
    assert first["warnings"] == warned and "outside what MetaStone-nano can do" in warned[0]
    assert "warnings" not in second


# --- Ray --------------------------------------------------------------------------------------


def test_ray_run_equals_the_local_run_and_resumes(clean_run, tmp_path):
    ray = pytest.importorskip("ray")
    inp, clean_out, clean = clean_run
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        address = ctx.address_info["address"]
        out = tmp_path / "ray.jsonl"
        proc = batch(inp, out, "--effort", "low", "--ray", address)
        assert proc.returncode == 0, proc.stderr
        assert stable(read_records(out)) == stable(clean)  # record for record, in input order
        # resume on Ray: a local run's first 17 records, the rest on Ray
        part = tmp_path / "part.jsonl"
        copy_output(clean_out, part, 17)
        proc = batch(inp, part, "--effort", "low", "--ray", address, "--workers", "2")
        assert proc.returncode == 0, proc.stderr
        assert "resumed after 17" in proc.stdout
        assert stable(read_records(part)) == stable(clean)
    finally:
        ray.shutdown()


def test_ray_missing_says_how_to_install(tmp_path):
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    inp = write_input(tmp_path / "in.jsonl", 2)
    env = dict(os.environ, PYTHONPATH=f"{fake.parent}{os.pathsep}{REPO}")
    cmd = [sys.executable, "-m", "edge_metastone", "batch", str(inp), "-o", str(tmp_path / "o")]
    proc = subprocess.run([*cmd, "--ray"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "edge-metastone batch: error: --ray needs Ray: pip install 'edge-metastone[ray]'"
    )


# --- sweep ------------------------------------------------------------------------------------


def test_sweep_scores_every_selector_on_the_same_candidates_and_plots(tmp_path):
    from edge_metastone.search.base import StrategyName
    from edge_metastone.training.metrics import CHOOSERS, ProblemSamples

    inp = write_input(tmp_path / "in.jsonl", 12, seed=9)
    out = tmp_path / "out.jsonl"
    proc = batch(inp, out, "--sweep", "low,medium", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    png = tmp_path / "out.sweep.png"
    assert summary["sweep"]["png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    recs = read_records(out)
    assert [r["effort"] for r in recs] == ["low"] * 12 + ["medium"] * 12
    pts = summary["sweep"]["points"]
    for mode, k in (("low", 2), ("medium", 8)):
        mine = [r for r in recs if r["effort"] == mode]
        assert all(len(r["candidates"]) == k for r in mine)
        assert all(c["mean_logprob"] is not None for r in mine for c in r["candidates"])
        tokens = sum(r["tokens"] for r in mine)  # no generation beyond the records' candidates
        assert pts[mode]["compute"] == tokens * summary["sweep"]["n_params"]
        assert pts[mode]["default"] == sum(r["correct"] for r in mine) / len(mine)
        for name in ("best-of-k", "vote", "logprob"):  # recomputed here from the records
            picks = [
                CHOOSERS[StrategyName(name)](
                    ProblemSamples(
                        [c["answer"] for c in r["candidates"]],
                        [c["correct"] for c in r["candidates"]],
                        [c["score"] for c in r["candidates"]],
                        [c["mean_logprob"] for c in r["candidates"]],
                        [],
                    )
                )
                for r in mine
            ]
            acc = sum(r["candidates"][p]["correct"] for r, p in zip(mine, picks, strict=True))
            assert pts[mode][name] == acc / len(mine)
        assert pts[mode]["oracle"] >= max(pts[mode][s] for s in ("default", "best-of-k", "logprob"))
    assert set(summary["sweep"]["fit"]) == {"default", "best-of-k", "vote", "logprob"}
    assert summary["sweep"]["n_params"] > 6_000_000  # MetaStone-nano: 6.4M
    proc = batch(inp, out, "--sweep", "low,high")
    assert proc.returncode == 1 and "modes" in proc.stderr
    proc = batch(inp, out, "--sweep", "low,auto")
    assert proc.returncode == 1 and "--sweep takes distinct modes" in proc.stderr
