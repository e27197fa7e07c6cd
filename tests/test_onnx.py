"""The ONNX backend: export, parity with HF transformers (float32), the same events as the llama.cpp
engine, per-candidate sampling, untrusted model directories, and every front on a directory."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import cli_json, run_cli
from edge_metastone.backend import Backend, generate_all
from edge_metastone.converters.onnx_export import export_onnx
from edge_metastone.errors import BadModelFileError, InvalidRequestError
from edge_metastone.onnx_backend.backend import OnnxBackend
from edge_metastone.onnx_backend.sampling import NumpySampler
from edge_metastone.reasoner import Reasoner
from edge_metastone.runtime import open_backend
from edge_metastone.scheduler import MIB, Calibration
from edge_metastone.types import (
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
    TokenEvent,
)
from reference_scorer import load_reference, reference_forward, reference_score

PARITY_TOL = 1e-4
DELIM, THINK, THINK_END = 258, 1003, 1004  # fixture ids of ".\n\n", "<think>", "</think>"
STEPPY = ((DELIM, 4.0),)  # the random model rarely samples a delimiter by itself
CAL = Calibration({1: 0.01, 2: 0.011, 4: 0.012, 8: 0.015, 16: 0.02, 32: 0.03}, 2000.0, 200 * MIB, 2)
TEXTS = [
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    "First, compute 12 + 7 = 19.\n\nLet me check: 19 - 7 = 12.\n\nSo the answer is 19.\n\n"
    "</think> The final answer is \\boxed{19}.",
    "Question: Alice has 9 apples.\nFirst, compute 9 - 2 = 7.\n\nSo the answer is 7.\n\n",
]


@pytest.fixture(scope="module")
def onnx_dirs(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {t: export_onnx(tiny_hf, out / f"tiny-{t}", t).path for t in ("f32", "int4")}


@pytest.fixture(scope="module")
def f32(onnx_dirs):
    with OnnxBackend(onnx_dirs["f32"]) as b:
        yield b


@pytest.fixture(scope="module")
def reference(tiny_hf):
    return load_reference(tiny_hf)


@pytest.fixture(scope="module")
def prompt_ids(f32):
    return f32.encode_chat([{"role": "user", "content": "What is 12 + 7?"}])[1]


def long_text() -> str:
    """More than one 512-token prefill chunk."""
    return TEXTS[0] + "".join(f"Then {i} + 1 = {i + 1}.\n\n" for i in range(150))


def test_export_writes_the_spec_facts(onnx_dirs, tiny_hf):
    for t, path in onnx_dirs.items():
        meta = json.loads((path / "metastone.json").read_text())
        assert meta["out_type"] == t
        assert meta["metastone.step_token_ids"] == [DELIM]
        assert (meta["metastone.think_start_id"], meta["metastone.think_end_id"]) == (
            THINK,
            THINK_END,
        )
        assert meta["metastone.sprm.feature_layer"] == 2  # L-2 of 4 layers
        assert meta["metastone.sprm.hidden_size"] == 256
        assert meta["sprm_output"] == "sprm_logits"
        assert (path / "tokenizer.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()
    import onnx

    q = onnx.load(str(onnx_dirs["int4"] / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in q.graph.node}
    assert ops["layers.0.q_proj_Q4"] == "MatMulNBits"
    assert ops["lm_head_Q8"] == "MatMulNBits"
    assert ops["sprm.fc1"] == "MatMul" and ops["sprm.fc2"] == "MatMul"  # the head stays float
    size = {t: sum(f.stat().st_size for f in p.iterdir()) for t, p in onnx_dirs.items()}
    assert size["int4"] < size["f32"] / 3


@pytest.mark.parametrize("text", [*TEXTS, "long"])
def test_f32_logits_features_and_step_logits_match_hf(f32, reference, text):
    """Every position of a full pass (chunked across 512-token prefills for the long text)."""
    model, tokenizer, head = reference
    text = long_text() if text == "long" else text
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert f32.tokenize(text) == ids
    ref_logits, ref_feats = reference_forward(model, ids)
    import torch

    with torch.no_grad():
        ref_steps = head(torch.from_numpy(ref_feats))[:, 0].numpy()
    logits, feats, steps = f32.forward(ids)
    diffs = {
        "logits": float(np.abs(logits - ref_logits).max()),
        "features": float(np.abs(feats - ref_feats).max()),
        "step logits": float(np.abs(steps - ref_steps).max()),
    }
    print(f"{len(ids)} tokens, max |ONNX f32 - HF f32|: {diffs}")
    assert all(d < PARITY_TOL for d in diffs.values()), diffs


def test_score_command_matches_the_reference_scorer(onnx_dirs, reference, tmp_path):
    model, tokenizer, head = reference
    for i, text in enumerate([*TEXTS, long_text()]):
        path = tmp_path / f"t{i}.txt"
        path.write_text(text)
        got = cli_json(
            "score", "--model", str(onnx_dirs["f32"]), "--text-file", str(path), "--json"
        )
        ref = reference_score(model, tokenizer, head, text)
        assert got["positions"] == ref["positions"] and got["positions"]
        diff = float(np.abs(np.subtract(got["step_scores"], ref["step_scores"])).max())
        print(f"text {i}: {len(ref['positions'])} steps, max |step score diff| {diff:.2e}")
        assert diff < PARITY_TOL
        assert got["score"] == pytest.approx(ref["score"], abs=PARITY_TOL)


def test_online_step_scores_equal_a_full_pass(f32, prompt_ids):
    """The incremental KV path (prefill once, k rows, one token per step) against one pass."""
    sp = SamplingSettings(temperature=1.0, seed=3, logit_bias=STEPPY)
    cands = generate_all(f32, prompt_ids, 4, sp, GenerationSettings(max_new_tokens=80))
    n_steps = 0
    for c in cands:
        ref = f32.score_tokens(prompt_ids + c.token_ids)
        assert c.step_positions == ref.positions
        if ref.step_scores:
            diff = float(np.abs(np.subtract(c.step_scores, ref.step_scores)).max())
            assert diff < 1e-5, f"candidate {c.index}: {diff:.2e}"
        n_steps += len(c.step_scores)
    assert n_steps >= 4


def _events(backend: Backend, prompt, sp, gen, k=2):
    out = []
    for ev in backend.generate(prompt, k, sp, gen):
        if isinstance(ev, TokenEvent):
            out.append(("token", ev.candidate, ev.token_id, ev.text))
        elif isinstance(ev, StepEvent):
            out.append(("step", ev.candidate, ev.position, round(ev.score, 4)))
        else:
            r = ev.result
            steps = tuple(round(s, 4) for s in r.step_scores)
            out.append(("finish", ev.candidate, tuple(r.token_ids), r.text, ev.text_tail, r.finish_reason, steps))  # fmt: skip
    return out


@pytest.mark.parametrize(
    "gen",
    [
        GenerationSettings(max_new_tokens=60),
        GenerationSettings(max_new_tokens=60, stop=("\n\n",)),
        GenerationSettings(max_new_tokens=200, max_answer_tokens=5),
    ],
    ids=["plain", "stop", "answer-budget"],
)
def test_same_events_as_the_llama_cpp_engine_greedy_f32(f32, tiny_gguf, prompt_ids, gen):
    """Both float32 models decode greedily: the token, step and finish events are the same, in
    the same order (scores to 4 decimals)."""
    bias = STEPPY + (((THINK_END, 3.0),) if gen.max_answer_tokens else ())
    sp = SamplingSettings(temperature=0, logit_bias=bias)
    with open_backend(tiny_gguf("f32"), parity=True) as gguf:
        assert gguf.eog_ids == f32.eog_ids
        assert gguf.encode_chat([{"role": "user", "content": "hi <think> </think>"}]) == (
            f32.encode_chat([{"role": "user", "content": "hi <think> </think>"}])
        )
        want = _events(gguf, prompt_ids, sp, gen)
    got = _events(f32, prompt_ids, sp, gen)
    assert got == want
    assert any(e[0] == "step" for e in got)


def test_candidates_depend_on_seed_and_index_only(f32, prompt_ids):
    sp = SamplingSettings(temperature=1.0, top_p=0.9, top_k=50, seed=7, logit_bias=STEPPY)
    gen = GenerationSettings(max_new_tokens=30)
    batch = generate_all(f32, prompt_ids, 4, sp, gen)
    alone = list(f32.generate(prompt_ids, 1, sp, gen, candidate_offset=2))
    third = next(e.result for e in alone if isinstance(e, FinishEvent))
    assert third.index == 2 and third.token_ids == batch[2].token_ids
    assert len({tuple(c.token_ids) for c in batch}) == 4
    again = generate_all(f32, prompt_ids, 4, sp, gen)
    assert [c.token_ids for c in again] == [c.token_ids for c in batch]


def test_prune_halt_logprobs_and_features(f32, prompt_ids):
    control = GenerationControl()
    sp = SamplingSettings(temperature=1.0, seed=1, logit_bias=STEPPY)
    gen = GenerationSettings(max_new_tokens=40, logprobs=True, keep_features=True)
    done = {}
    for ev in f32.generate(prompt_ids, 3, sp, gen, control=control):
        if isinstance(ev, TokenEvent) and ev.candidate == 1:
            control.prune(1)
        if isinstance(ev, FinishEvent):
            done[ev.candidate] = ev.result
    assert done[1].finish_reason is FinishReason.PRUNED and done[1].n_tokens == 1
    assert control.timings.generated_tokens == sum(c.n_tokens for c in done.values())
    c = max(done.values(), key=lambda c: len(c.step_positions))
    assert c.mean_logprob is not None and c.mean_logprob < 0
    _, feats, _ = f32.forward(prompt_ids + c.token_ids)
    assert c.step_features.shape == (len(c.step_positions), 256)
    assert np.abs(c.step_features - feats[c.step_positions]).max() < 1e-4


def test_sampler_chain_on_hand_built_logits():
    z = np.log(np.asarray([0.5, 0.3, 0.15, 0.05], dtype=np.float32))

    def draws(n=400, **kw):
        s = NumpySampler(SamplingSettings(**{"temperature": 1.0, "top_p": 1.0, **kw}), 0, 4)
        return {s.sample(z) for _ in range(n)}

    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws(min_p=0.5) == {0, 1}  # p >= 0.5 * 0.5
    assert draws() == {0, 1, 2, 3}
    assert draws(n=5, temperature=0, logit_bias=((3, 10.0),)) == {3}
    greedy = NumpySampler(SamplingSettings(temperature=0, repeat_penalty=4.0), 0, 4)
    greedy.accept_all([0])
    assert greedy.sample(z) == 1  # 0's logit (< 0) times 4 falls below 1's
    with pytest.raises(InvalidRequestError):
        NumpySampler(SamplingSettings(logit_bias=((9, 1.0),)), 0, 4)


def test_reasoner_and_reason_command_on_a_directory(onnx_dirs):
    with Reasoner(onnx_dirs["int4"], calibration=CAL) as r:
        assert r.backend.runtime.startswith("onnxruntime")
        res = r.reason("What is 2+2?", effort="low", seed=0, max_new_tokens=24)
        assert res.k == 2 and len(res.candidates) == 2
    out = cli_json(
        "reason", "--model", str(onnx_dirs["int4"]), "--effort", "low", "--max-new-tokens", "16",
        "--json", "What is 2+2?",
    )  # fmt: skip
    assert out["k"] == 2 and out["prompt_text"].endswith("<think>\n")
    assert all(c["tokens"] == len(c["token_ids"]) for c in out["candidates"])


def _broken(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _meta_edit(**changes):
    def edit(d: Path) -> None:
        meta = json.loads((d / "metastone.json").read_text())
        for k, v in changes.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        (d / "metastone.json").write_text(json.dumps(meta))

    return edit


def test_untrusted_directories_get_one_line_errors(onnx_dirs, tmp_path):
    src = onnx_dirs["int4"]
    cases = {
        "not-json": (lambda d: (d / "metastone.json").write_text("{oops"), "cannot be read"),
        "format": (_meta_edit(format="other"), "format"),
        "step-ids": (_meta_edit(**{"metastone.step_token_ids": [10**9]}), "step_token_ids"),
        "layers": (_meta_edit(n_layers=6), "does not match"),
        "vocab": (_meta_edit(vocab_size=2048), "shapes do not match"),
        "graph": (lambda d: (d / "model.onnx").write_bytes(b"\x08\x07garbage"), "cannot load"),
        "no-meta": (lambda d: (d / "metastone.json").unlink(), "no metastone.json"),
        "tokenizer": (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer.json"),
    }
    for name, (edit, message) in cases.items():
        d = _broken(src, tmp_path / name, edit)
        with pytest.raises(BadModelFileError, match=message):
            open_backend(d)
    proc = run_cli("reason", "--model", str(tmp_path / "layers"), "hi")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "does not match" in proc.stderr, proc.stderr
    data = tmp_path / "problems.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    proc = run_cli(
        "train-sprm", "--model", str(src), "--data", str(data), "-o", str(tmp_path / "o")
    )
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "needs a GGUF model" in proc.stderr, proc.stderr


def test_convert_command_writes_a_directory(tiny_hf, tmp_path):
    out = tmp_path / "m"
    proc = run_cli("convert", str(tiny_hf), "--format", "onnx", "-o", str(out), "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.onnx").is_file() and "onnx f32" in proc.stderr
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    proc = run_cli("convert", str(tiny_hf), "--format", "onnx", "-o", str(tmp_path / "keep"))
    assert proc.returncode != 0 and "refusing to overwrite" in proc.stderr
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


def test_calibration_key_sees_a_rewritten_model_file(onnx_dirs, tmp_path):
    import os

    from edge_metastone.calibration import calibration_key

    d = tmp_path / "copy"
    shutil.copytree(onnx_dirs["int4"], d)
    before = calibration_key(d, 2, "onnxruntime")
    dir_mtime = d.stat().st_mtime_ns
    data = d / "model.onnx.data"
    st = data.stat()
    data.write_bytes(data.read_bytes())  # same size, rewritten in place
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert d.stat().st_mtime_ns == dir_mtime  # the directory's own stamp did not move
    assert calibration_key(d, 2, "onnxruntime") != before


def test_batch_runs_and_resumes_on_a_directory(onnx_dirs, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "a", "prompt": "What is 2+2?", "answer": "4"}\n')
    out = tmp_path / "out.jsonl"
    args = ["batch", str(data), "-o", str(out), "--model", str(onnx_dirs["int4"])]
    args += ["--effort", "low", "--max-new-tokens", "8", "--no-progress"]
    for _ in range(2):  # the second run resumes: the model directory's identity is stable
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a"] and records[0]["k"] == 2


def test_real_vocabulary_directory_renders_and_stops_as_the_gguf(qwen_hf, qwen_gguf, tmp_path):
    """Qwen's real tokenizer: the ONNX directory's chat encoding (the tokenizer's own special
    tokens as template variables: no bos_token) equals the GGUF engine's, and a decomposed stop
    string matches in the tokenizer's normal form there too."""
    from edge_metastone.engine.engine import Engine

    path = export_onnx(qwen_hf, tmp_path / "qwen-onnx", "f32").path
    meta = json.loads((path / "metastone.json").read_text())
    assert meta["metastone.tokenizer.normalizer"] == "NFC"
    assert "bos_token" not in meta["metastone.tokenizer.special_tokens"]
    conversations = [
        [{"role": "user", "content": "Is cafe\u0301 the same as café? Think."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "한국어 \u1100\u1161 and <think> as text"},
        ],
    ]
    with OnnxBackend(path) as onnx, Engine(qwen_gguf) as gguf:
        assert onnx.template._special == gguf.template._special
        for msgs in conversations:
            assert onnx.encode_chat(msgs) == gguf.encode_chat(msgs)
        ids = onnx.encode_chat(conversations[0])[1]
        (cafe,) = onnx.tokenize(" café")  # one token in Qwen's vocabulary
        sampling = SamplingSettings(temperature=0.0, logit_bias=((cafe, 100.0),))
        settings = GenerationSettings(max_new_tokens=6, score_steps=False, stop=("cafe\u0301",))
        (cand,) = generate_all(onnx, ids, 1, sampling, settings)
        assert cand.finish_reason is FinishReason.STOP and cand.text == ""


def test_waves_on_onnx_equal_one_batch_over_one_prompt_pass(f32, prompt_ids):
    """Adaptive compute's waves run in the same decode loop on onnxruntime: a later wave starts
    from the kept prompt cache, and its candidates equal a one-batch run's."""
    from edge_metastone.types import FinishEvent, GenerationControl, WaveEvent

    sampling = SamplingSettings(temperature=1.0, top_p=1.0, seed=3)
    settings = GenerationSettings(max_new_tokens=10, logprobs=True)
    whole = f32.generate_all(prompt_ids, 6, sampling, settings)
    control, done = GenerationControl(), []
    waved = dataclasses.replace(settings, max_candidates=6)
    for ev in f32.generate(prompt_ids, 2, sampling, waved, control=control):
        if isinstance(ev, WaveEvent) and ev.phase == "end":
            control.extend(4)
        elif isinstance(ev, FinishEvent):
            done.append(ev.result)
    done.sort(key=lambda c: c.index)
    assert [c.token_ids for c in done] == [c.token_ids for c in whole]
    assert control.timings.prefill_tokens == len(prompt_ids) + 4 and control.timings.waves == 2
