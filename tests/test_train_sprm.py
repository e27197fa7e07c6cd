"""train-sprm: the SPR loss by hand, features kept in-stream vs a full pass, the planted signal,
kill-and-resume of the collection, and the model copy / sidecar it writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from edge_metastone import keys
from edge_metastone.engine.engine import Engine
from edge_metastone.engine.scoring import forward_features
from edge_metastone.errors import InvalidRequestError
from edge_metastone.modelfile.copy import write_model_copy
from edge_metastone.modelfile.read import open_model_file
from edge_metastone.reasoner import Reasoner
from edge_metastone.sprm import SprmHead, StepRule
from edge_metastone.training.collect import ProblemData
from edge_metastone.training.loss import bce_loss, spr_loss
from edge_metastone.training.metrics import auc, within_auc
from edge_metastone.training.train import (
    TrainSettings,
    answer_key,
    feature_scale,
    fold_scale,
    split,
    train_head,
)
from edge_metastone.types import GenerationSettings, SamplingSettings
from fixtures.make_planted import GOLD, build_planted

PARITY_TOL = 1e-4
DELIM = 258  # the fixture's ".\n\n"


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


# --- the loss, by hand ------------------------------------------------------------------------


def test_spr_loss_matches_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0, -3.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # kept: 2.0 (positive, y=1), -0.5 and -3.0 (negative, y=0); -1.0/y=1 and 0.5, 1.0/y=0 disagree
    p, n = 1 + 1, 2 + 1
    w_pos, w_neg = 1.5 * n / (p + n), p / (p + n)  # 0.9 and 0.4
    l_pos = softplus(-2.0)  # -log sigmoid(2)
    l_negs = softplus(-0.5) + softplus(-3.0)  # -log(1 - sigmoid(z)) = log(1 + e^z)
    expected = (w_pos * l_pos + w_neg * l_negs) / (w_pos + 2 * w_neg)
    got = spr_loss(logits, y)
    assert abs(got.item() - expected) < 1e-6, (got.item(), expected)
    got.backward()
    # filtered steps get no gradient at all
    assert logits.grad[[1, 2, 4]].abs().max().item() == 0.0
    assert (logits.grad[[0, 3, 5]] != 0).all()


def test_spr_loss_with_nothing_kept_is_zero_and_bce_is_plain_mean():
    logits = torch.tensor([-1.0, 1.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0])
    loss = spr_loss(logits, y)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.abs().max().item() == 0.0
    expected = (softplus(1.0) + softplus(1.0)) / 2  # both wrong by a logit of 1
    assert abs(bce_loss(logits, y).item() - expected) < 1e-6


def test_auc_exact_on_hand_built_scores():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts one half
    assert auc([0.2, 0.3], [1, 1]) is None
    mean, n = within_auc([[0.1, 0.9], [0.9, 0.1], [0.3, 0.4]], [[0, 1], [0, 1], [1, 1]])
    assert (mean, n) == (0.5, 2)


# --- features kept in-stream ------------------------------------------------------------------


def test_validation_holds_out_whole_answer_values():
    """No validation problem's answer is a training problem's answer (numbers by value), about
    val_split of the problems are held out, and the same seed gives the same split."""
    answers = [str(v) for v in range(3, 28)] * 6 + ["9.0", " 9", "1,000", "1000"]
    problems = [(f"p{i}", a) for i, a in enumerate(answers)]
    train, val, how = split(problems, 0.2, seed=0)
    assert how == "answer" and train and val and not train & val
    assert train | val == {k for k, _ in problems}
    val_answers = {answer_key(a) for k, a in problems if k in val}
    train_answers = {answer_key(a) for k, a in problems if k in train}
    assert not val_answers & train_answers
    assert 0.2 <= len(val) / len(problems) <= 0.3
    assert split(problems, 0.2, seed=0) == (train, val, how)
    assert answer_key("9.0") == answer_key(" 9") == answer_key("9") != answer_key("19")
    assert answer_key("1,000") == answer_key("1000") and answer_key("X + 1") == "x+1"


def test_few_distinct_answers_split_by_problem():
    """With fewer than five distinct answers there is nothing to hold out by value: problems are
    drawn one by one, at least one on each side; val_split 0 holds none out."""
    problems = [(f"p{i}", "AB"[i % 2]) for i in range(10)]
    train, val, how = split(problems, 0.2, seed=1)
    assert how == "problem" and len(val) == 2 and len(train) == 8 and not train & val
    assert split(problems[:2], 0.01, seed=1)[2] == "problem"
    assert [len(s) for s in split(problems[:2], 0.01, seed=1)[:2]] == [1, 1]
    assert split(problems, 0.0, seed=1) == ({k for k, _ in problems}, set(), "none")


def test_kept_features_equal_full_pass_features(tiny_gguf):
    path = tiny_gguf("f32")
    sampling = SamplingSettings(temperature=1.0, top_p=0.95, seed=11, logit_bias=((DELIM, 4.0),))
    with Engine(path, parity=True) as engine:
        ids = engine.tokenize(engine.render([{"role": "user", "content": "What is 3 + 4?"}]))
        keep = GenerationSettings(max_new_tokens=80, keep_features=True)
        cands = engine.generate_all(ids, 3, sampling, keep)
        plain = engine.generate_all(ids, 3, sampling, GenerationSettings(max_new_tokens=80))
        n_steps = 0
        for c, p in zip(cands, plain, strict=True):
            assert c.token_ids == p.token_ids and p.step_features is None
            full, _ = forward_features(engine.model, ids + c.token_ids, engine.feature_layer)
            assert c.step_features.shape == (len(c.step_positions), engine.model.n_embd)
            diff = np.abs(c.step_features - full[c.step_positions]).max(initial=0.0)
            assert diff < PARITY_TOL, f"max |diff| {diff:.2e}"
            n_steps += len(c.step_positions)
        assert n_steps >= 5


def test_features_kept_for_a_model_without_head(tiny_untied_hf, tmp_path):
    from edge_metastone.converters.convert import convert

    path = tmp_path / "nohead.gguf"
    convert(tiny_untied_hf, path, "f32")
    sampling = SamplingSettings(temperature=1.0, seed=2, logit_bias=((DELIM, 5.0),))
    with Engine(path, parity=True) as engine:
        assert not engine.has_head and engine.feature_layer == 8 - 2
        ids = engine.tokenize(engine.render([{"role": "user", "content": "Hi"}]))
        c = engine.generate_all(ids, 1, sampling, GenerationSettings(40, keep_features=True))[0]
        assert c.score is None and c.step_scores == []
        assert len(c.step_positions) >= 1
        full, _ = forward_features(engine.model, ids + c.token_ids, 6)
        assert np.abs(c.step_features - full[c.step_positions]).max() < PARITY_TOL


# --- the planted signal, end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    from edge_metastone.converters.convert import convert

    root = tmp_path_factory.mktemp("planted")
    hf = build_planted(root / "hf")
    convert(hf, root / "planted.gguf", "f32")
    return root / "planted.gguf"


def write_problems(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {"prompt": f"Case {i}: which digit, given {i * 7 % 13}?", "answer": GOLD}
                )
            )
            f.write("\n")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_planted_signal_is_learned_and_input_untouched(planted, tmp_path):
    data = write_problems(tmp_path / "p.jsonl", 40)
    before = sha(planted)
    out = tmp_path / "planted.sprm.gguf"
    proc = run_cli(
        "train-sprm", "--model", str(planted), "--data", str(data), "-o", str(out),
        "--samples", "8", "--max-new-tokens", "16", "--threads", "1", "--json", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    v = report["validation"]
    assert v["problems_with_both_classes"] >= 4
    assert v["trajectory_auc_within"] > 0.9, v
    assert v["best_of_k"]["best-of-k"] > v["best_of_k"]["random"]
    assert sha(planted) == before
    mf = open_model_file(planted, out)
    assert mf.head is not None and mf.head.feature_layer == 2
    side = gguf.GGUFReader(out)
    assert side.get_field(keys.SPRM_TRAINED_WITH).contents() == "spr"
    assert json.loads(Path(report["report_file"]).read_text())["validation"] == v
    # the combined selector, fitted on the validation problems, recorded with its numbers
    sel = json.loads(side.get_field(keys.SELECTOR).contents())
    assert sel == report["selector"] and json.loads(mf.policy_keys.selector) == sel
    m = sel["measured"]
    assert m["problems"] == v["problems"] and not m["validation_is_training_set"]
    assert report["validation_split"] == "problem"  # every problem has the one answer GOLD
    # the fronts read the head's measured quality from the sidecar it was recorded in
    from edge_metastone.modelfile.about import about

    facts = about(planted, out)
    assert facts.head_auc_within == pytest.approx(v["trajectory_auc_within"])
    assert facts.logprob_auc_within == pytest.approx(v["logprob_auc_within"])
    assert about(planted).head_auc_within is None  # no sidecar beside the model
    assert m["auc_within"]["head"] > 0.9 and m["auc_within"]["combined"] > 0.8, m
    assert m["default_strategy"] == report["default_strategy"] == mf.policy_keys.default_strategy
    with Reasoner(model=planted, head=out, n_threads=1) as r:
        assert r.default_strategy.value == report["default_strategy"]


def test_form_auto_keeps_the_form_with_the_higher_validation_auc(planted, tmp_path):
    """`--form auto` trains the MLP (SPR) and the linear form on the same steps, reports both on
    the validation problems, keeps the better, and records the kept form and its loss."""
    data = write_problems(tmp_path / "p.jsonl", 40)
    out = tmp_path / "auto.sprm.gguf"
    proc = run_cli(
        "train-sprm", "--model", str(planted), "--data", str(data), "-o", str(out), "--form",
        "auto", "--samples", "8", "--max-new-tokens", "16", "--threads", "1", "--json",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    forms = report["forms"]
    chosen = forms["chosen"]
    aucs = {f: forms[f]["trajectory_auc_within"] for f in ("mlp", "linear")}
    assert chosen == max(aucs, key=lambda f: (aucs[f], f == "mlp")), forms
    assert report["validation"] == forms[chosen] and report["train"]["form"] == chosen
    assert report["train"]["loss"] == ("bce" if chosen == "linear" else "spr")
    side = gguf.GGUFReader(out)
    assert side.get_field(keys.SPRM_TRAINED_WITH).contents() == report["train"]["loss"]
    prov = json.loads(side.get_field(keys.PROVENANCE).contents())
    assert prov["sprm"]["form"] == chosen
    head = open_model_file(planted, out).head
    linear_shape = not head.fc1_weight[2:].any() and not head.fc2_weight[2:].any()
    assert linear_shape == (chosen == "linear")  # the head written is the form kept


def test_train_sprm_refuses_to_overwrite_its_input(planted, tmp_path):
    data = write_problems(tmp_path / "p.jsonl", 4)
    proc = run_cli("train-sprm", "--model", str(planted), "--data", str(data), "-o", str(planted))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "must not be an input" in proc.stderr


def test_bad_problem_line_is_one_clear_error(planted, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": 3}\n')
    proc = run_cli(
        "train-sprm", "--model", str(planted), "--data", str(data), "-o", str(tmp_path / "o.gguf")
    )
    assert proc.returncode == 1
    assert "bad.jsonl:2" in proc.stderr and "Traceback" not in proc.stderr


# --- kill and resume --------------------------------------------------------------------------


def _start(planted: Path, data: Path, out: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [
        sys.executable, "-m", "edge_metastone", "train-sprm", "--model", str(planted),
        "--data", str(data), "-o", str(out), "--cache", str(cache), "--samples", "4",
        "--max-new-tokens", "16", "--threads", "1", "--no-progress", "--epochs", "2",
    ]  # fmt: skip
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _journal(cache: Path) -> list[str]:
    path = cache / "journal.log"
    return path.read_text().split() if path.is_file() else []


def test_collection_survives_sigkill_without_loss_or_duplicates(planted, tmp_path):
    n = 150
    data = write_problems(tmp_path / "p.jsonl", n)
    cache = tmp_path / "cache"
    kills = 0
    for threshold in (10, 40, 90):
        proc = _start(planted, data, tmp_path / "out.sprm.gguf", cache)
        deadline = time.monotonic() + 120
        while len(_journal(cache)) < threshold and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert len(_journal(cache)) < n, "the run finished before it could be killed"
    assert kills == 3
    proc = _start(planted, data, tmp_path / "out.sprm.gguf", cache)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    journal = _journal(cache)
    assert len(journal) == n and len(set(journal)) == n  # 0 lost, 0 sampled twice
    assert not list(cache.glob("*.partial"))
    # equal to an uninterrupted run
    clean = tmp_path / "clean"
    proc = _start(planted, data, tmp_path / "clean.sprm.gguf", clean)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    for key in journal:
        a, b = ProblemData.load(cache / f"{key}.npz"), ProblemData.load(clean / f"{key}.npz")
        assert np.array_equal(a.features, b.features) and a.answers == b.answers
        assert np.array_equal(a.correct, b.correct) and np.array_equal(a.steps, b.steps)


def test_cache_of_other_settings_is_refused(planted, tmp_path):
    data = write_problems(tmp_path / "p.jsonl", 3)
    cache = tmp_path / "cache"
    base = ["train-sprm", "--model", str(planted), "--data", str(data), "--cache", str(cache)]
    base += ["--max-new-tokens", "16", "--no-progress", "--epochs", "1"]
    assert run_cli(*base, "-o", str(tmp_path / "a.sprm.gguf")).returncode == 0
    proc = run_cli(*base, "-o", str(tmp_path / "b.sprm.gguf"), "--temperature", "1.2")
    assert proc.returncode == 1 and "other settings" in proc.stderr


# --- writing a head ---------------------------------------------------------------------------


def test_model_copy_keeps_every_key_and_tensor_byte(tiny_gguf, tmp_path):
    src = tiny_gguf("q8_0")
    before = sha(src)
    mf = open_model_file(src)
    rng = np.random.default_rng(0)
    c = mf.n_embd
    head = SprmHead(
        rng.standard_normal((2 * c, c)).astype(np.float32),
        rng.standard_normal(2 * c).astype(np.float32),
        rng.standard_normal(2 * c).astype(np.float32),
        np.array([0.25], np.float32),
        feature_layer=mf.n_layers - 2,
    )
    rule = StepRule.of(mf.step_token_ids, mf.think_start_id, mf.think_end_id)
    dst = write_model_copy(
        src, tmp_path / "copy.gguf", head=head, rule=rule, extra={keys.SPRM_TRAINED_WITH: "bce"}
    )
    assert sha(src) == before
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    head_keys = {k for k in a.fields if k.startswith("metastone.")}
    for name, field in a.fields.items():
        if name in head_keys or name.startswith("GGUF."):
            continue
        other = b.get_field(name)
        assert other is not None, name
        assert field.types == other.types, name
        if (
            field.types[0] is gguf.GGUFValueType.ARRAY
            and field.types[-1] is not gguf.GGUFValueType.STRING
        ):
            assert np.array_equal(field.parts[field.data[0]], other.parts[other.data[0]]), name
        else:
            assert field.contents() == other.contents(), name
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name
    got = open_model_file(dst).head
    assert np.array_equal(got.fc1_weight, head.fc1_weight) and got.fc2_bias[0] == np.float32(0.25)
    assert b.get_field(keys.SPRM_TRAINED_WITH).contents() == "bce"
    # stock llama.cpp loads and runs the copy
    from llama_cpp import Llama

    llm = Llama(str(dst), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"hello")) > 0
    llm.close()


def test_fc1_folds_the_feature_scaling_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * [1, 3, 0.1, 1, 1, 1] + [500, 0, 2, 0, 0, 0]
    mu, sd = feature_scale(x)
    w, b = rng.normal(size=(12, 6)).astype(np.float32), rng.normal(size=12).astype(np.float32)
    fw, fb = fold_scale(w, b, mu, sd)
    diff = np.abs((x @ fw.T + fb) - (((x - mu) / sd) @ w.T + b)).max()
    assert diff < 1e-3, f"max difference {diff:.2e}"
    assert feature_scale(np.ones((4, 2)))[1].tolist() == [1.0, 1.0]  # constant: left alone


def test_spr_head_learns_beside_a_massive_dimension():
    """A real model's stream has a dimension hundreds of times the others (SmolLM2: ~574): on raw
    features the SPR loss's sign filter saturated every score at 1; trained on standardised ones
    (folded back into fc1) the head separates the classes."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    x[:, 0] = 574.0 + rng.normal(0, 2, 600)
    y = (x[:, 1] + 0.3 * rng.normal(size=600) > 0).astype(np.float32)
    head, _ = train_head(x, y, TrainSettings(epochs=100, batch_size=64), feature_layer=2)
    s = head.scores(x)  # on raw features (measured): 90% of the scores in 0.9994-0.99997
    assert auc(s, y) > 0.95 and (s < 0.5).mean() > 0.2, (auc(s, y), np.percentile(s, [5, 50, 95]))


def test_linear_form_is_the_logistic_fit_in_the_heads_shape():
    """The linear form writes SPEC §1's head computing exactly the logistic regression's logit,
    and that fit is the optimum: its gradient (log-loss + l2/2 |w|^2 on standardised features)
    vanishes, checked here independently of the fitting code."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) * np.array([1, 2, 50, 1, 1, 0.1]) + 3
    y = (x[:, 0] + 0.05 * x[:, 2] + rng.normal(size=400) > 3.5).astype(np.float32)
    settings = TrainSettings(loss="bce", form="linear", l2=5.0)
    head, log = train_head(x.astype(np.float32), y, settings, feature_layer=4)
    assert head.fc1_weight.shape == (12, 6) and head.feature_layer == 4
    z = head.logits(x.astype(np.float32))
    mu, sd = x.mean(0), x.std(0)
    xs = (x - mu) / sd
    # the logit as a function of standardised features: w_s = w*sd, and its gradient
    w = head.fc1_weight[0].astype(np.float64)
    w_s = w * sd
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    grad = xs.T @ (p - y) + 5.0 * w_s
    assert np.abs(grad).max() < 1e-2, grad
    assert abs((p - y).sum()) < 1e-2  # the (nearly free) bias
    assert log.losses[0] > 0 and 0.5 < log.kept_fraction[0] <= 1
    assert np.allclose(z, x @ w + head.fc1_bias[0], atol=1e-3)


def test_linear_form_settings_are_checked():
    with pytest.raises(InvalidRequestError, match="bce"):
        TrainSettings(form="linear")  # the default loss is spr
    for bad in ({"form": "tree"}, {"l2": 0.0}, {"l2": math.inf}, {"lr": math.inf}):
        with pytest.raises(InvalidRequestError):
            TrainSettings(**{"loss": "bce", **bad})
