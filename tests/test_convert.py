"""Conversion parity: the GGUF runs in stock llama.cpp and matches HF transformers (float32)."""

from __future__ import annotations

import math

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from conftest import cli_json
from edge_metastone.engine.llama import Model
from edge_metastone.engine.scoring import forward_features
from edge_metastone.modelfile.read import open_model_file, read_gguf
from reference_scorer import load_reference, reference_forward, reference_score

TEXTS = [
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    "First, compute 12 + 7 = 19.\n\nThen check: 19 - 7 = 12.\n\nSo the sum is 19.\n\n</think>\n"
    "The answer is \\boxed{19}.\n\nDone.",
    # delimiter runs, a delimiter right after <think>, no </think>
    "<think>.\n\nWe add 3 and 4.\n\n.\n\nThe total is 7.\n\nCheck it twice.\n\n",
    # two <think> tags: start falls back to 0
    "Question.\n\n<think>Step one.\n\n<think>Step two.\n\nEnd.",
    "no delimiter at all",
]
PARITY_TOL = 1e-4  # F32 file, flash attention off, F32 KV cache
Q8_TOL = 2e-2


@pytest.fixture(scope="module")
def reference(tiny_hf):
    return load_reference(tiny_hf)


def test_f32_logits_match_hf_in_stock_llama_cpp_python(tiny_gguf, reference):
    """Stock `llama_cpp.Llama` loads the file; its logits equal HF float32 eager within 1e-4."""
    model, tokenizer, _ = reference
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    llm = llama_cpp.Llama(
        str(tiny_gguf("f32")),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    try:
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    ref_logits, _ = reference_forward(model, ids)
    diff = float(np.abs(ours - ref_logits[:, : ours.shape[1]]).max())
    assert diff < PARITY_TOL, f"max |logit diff| {diff:.3e} >= {PARITY_TOL}"


def test_f32_features_match_hf_hidden_states(tiny_gguf, reference):
    """`l_out-{L-2}` captured through cb_eval equals HF hidden_states[-2] within 1e-4."""
    model, tokenizer, _ = reference
    mf = open_model_file(tiny_gguf("f32"))
    ids = tokenizer.encode(TEXTS[0] * 3, add_special_tokens=False)
    with Model(mf.path) as m:
        feats, logits = forward_features(m, ids, mf.n_layers - 2, want_logits=True)
    ref_logits, ref_feats = reference_forward(model, ids)
    fdiff = float(np.abs(feats - ref_feats).max())
    ldiff = float(np.abs(logits - ref_logits).max())
    assert feats.shape == ref_feats.shape
    assert fdiff < PARITY_TOL, f"max |feature diff| {fdiff:.3e}"
    assert ldiff < PARITY_TOL, f"max |logit diff| {ldiff:.3e}"


def test_llama_cpp_tokenizer_matches_hf(tiny_gguf, reference):
    _, tokenizer, _ = reference
    with Model(tiny_gguf("f32")) as m:
        for text in [*TEXTS, "  leading spaces\tand tabs\n\n\nnewlines 123456 ünïcödé 数学"]:
            assert m.tokenize(text) == tokenizer.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize(("outtype", "tol"), [("f32", PARITY_TOL), ("q8_0", Q8_TOL)])
def test_score_json_matches_reference_scorer(tiny_gguf, reference, tmp_path, outtype, tol):
    model, tokenizer, head = reference
    path = tiny_gguf(outtype)
    for k, text in enumerate(TEXTS):
        text_file = tmp_path / f"t{k}.txt"
        text_file.write_text(text, encoding="utf-8")
        ours = cli_json("score", "--model", str(path), "--text-file", str(text_file), "--json")
        ref = reference_score(model, tokenizer, head, text)
        assert ours["positions"] == ref["positions"], text
        assert len(ours["step_scores"]) == len(ref["step_scores"])
        if ref["step_scores"]:
            diff = float(np.abs(np.subtract(ours["step_scores"], ref["step_scores"])).max())
            assert diff < tol, f"{outtype}: max |step score diff| {diff:.3e} (text {k})"
        assert ours["score"] == pytest.approx(ref["score"], abs=tol)
    # the fixture's texts do exercise scoring
    assert reference_score(model, tokenizer, head, TEXTS[0])["positions"]


@pytest.mark.parametrize("outtype", ["q4_0", "q4_k_m"])
def test_4bit_files_load_and_score_finitely(tiny_gguf, tmp_path, outtype):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXTS[0], encoding="utf-8")
    out = cli_json(
        "score", "--model", str(tiny_gguf(outtype)), "--text-file", str(text_file), "--json"
    )
    assert len(out["step_scores"]) >= 2
    assert all(0.0 < s < 1.0 for s in out["step_scores"])
    assert math.isfinite(out["score"]) and out["score"] > 0


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
def test_head_read_back_bit_for_bit(tiny_gguf, tiny_hf, outtype):
    src = torch.load(tiny_hf / "score_module.pt", weights_only=True)
    mf = open_model_file(tiny_gguf(outtype))
    head = mf.head
    assert head is not None and head.dtype == "f32"
    pairs = [
        (head.fc1_weight, src["0.weight"]),
        (head.fc1_bias, src["0.bias"]),
        (head.fc2_weight, src["3.weight"].reshape(-1)),
        (head.fc2_bias, src["3.bias"]),
    ]
    for got, want in pairs:
        want = want.numpy()
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert head.feature_layer == mf.n_layers - 2


def test_f16_output_keeps_f16_head_exact(tiny_hf, tmp_path):
    """A half-precision head is stored as f16 bit patterns and read back unchanged."""
    import shutil

    from edge_metastone.converters.convert import convert

    hf = tmp_path / "hf16"
    shutil.copytree(tiny_hf, hf)
    state = torch.load(hf / "score_module.pt", weights_only=True)
    half = {k: v.half() for k, v in state.items()}
    torch.save(half, hf / "score_module.pt")
    convert(hf, tmp_path / "m.gguf", "q4_0")
    head = open_model_file(tmp_path / "m.gguf").head
    assert head.dtype == "f16"
    # stored as the exact half-precision bit patterns ...
    raw = gguf.GGUFReader(tmp_path / "m.gguf").get_field(
        "metastone.sprm.fc1.weight"
    )  # stock reader
    assert raw.types[-1] is gguf.GGUFValueType.UINT16
    stored = np.array(raw.contents(), dtype=np.uint16)
    assert stored.tobytes() == half["0.weight"].numpy().tobytes()
    # ... and widened exactly, once, at load
    assert head.fc1_weight.dtype == np.float32
    assert np.array_equal(head.fc1_weight, half["0.weight"].float().numpy())
    assert np.array_equal(head.fc2_bias, half["3.bias"].float().numpy())


def test_inspect_reports_head_and_types(tiny_gguf):
    d = cli_json("inspect", str(tiny_gguf("q4_k_m")), "--json")
    assert d["architecture"] == "qwen2"
    assert d["sprm_head"]["hidden_size"] == d["hidden_size"] == 256
    assert d["sprm_head"]["inner_size"] == 512
    assert d["sprm_head"]["feature_layer"] == d["layers"] - 2
    assert set(d["tensor_types"]) == {"F32", "Q4_K", "Q6_K"}
    assert len(d["step_token_ids"]) == 1


def test_metadata_arrays_are_typed_as_spec_says(tiny_gguf):
    import gguf

    reader = read_gguf(tiny_gguf("q8_0"))
    fc1 = reader.get_field("metastone.sprm.fc1.weight")
    assert fc1.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    steps = reader.get_field("metastone.step_token_ids")
    assert steps.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert reader.get_field("metastone.sprm.version").types == [gguf.GGUFValueType.UINT32]
    assert reader.get_field("metastone.sprm.feature_layer").types == [gguf.GGUFValueType.INT32]


@pytest.mark.parametrize("outtype", ["f32", "q4_k_m"])
def test_fast_reader_agrees_with_stock_gguf_reader(tiny_gguf, outtype):
    """Our reader's shortcuts (numeric arrays as one view, struct-walked strings) change nothing."""
    import gguf

    ours, stock = read_gguf(tiny_gguf(outtype)), gguf.GGUFReader(tiny_gguf(outtype))
    assert list(ours.fields) == list(stock.fields)
    for key, field in stock.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types, key
        assert mine.offset == field.offset, key
        assert mine.contents() == field.contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in stock.tensors
    ]


def test_features_over_several_batches_match_hf(tiny_gguf, reference):
    """A text longer than one 512-token batch: captured rows stay in order across decodes."""
    model, tokenizer, _ = reference
    ids = tokenizer.encode(TEXTS[0] * 16, add_special_tokens=False)
    assert len(ids) > 1024
    with Model(tiny_gguf("f32")) as m:
        feats, _ = forward_features(m, ids, 2)
    _, ref_feats = reference_forward(model, ids)
    diff = float(np.abs(feats - ref_feats).max())
    assert diff < PARITY_TOL, f"max |feature diff| {diff:.3e} over {len(ids)} tokens"
