"""Checks of the tiny-checkpoint fixture and of the independent HF reference scorer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.make_tiny_metastone import build_tiny_metastone, main
from reference_scorer import (
    head_scores,
    load_reference,
    reference_forward,
    reference_score,
    scored_positions,
    trajectory_score,
)

S, T, E, X = 9, 1, 2, 5  # step delimiter, <think>, </think>, any other token


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_metastone(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return load_reference(tiny_dir)


# --- the fixture -------------------------------------------------------------------------------


def test_step_text_is_one_token(ref):
    _, tok, _ = ref
    assert len(tok.encode(".\n\n", add_special_tokens=False)) == 1
    assert len(tok.encode("7.\n\n", add_special_tokens=False)) == 2


def test_added_tokens_follow_bpe_vocab(tiny_dir, ref):
    model, tok, _ = ref
    raw = json.loads((tiny_dir / "tokenizer.json").read_text())
    n_bpe = len(raw["model"]["vocab"])
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    assert tok.convert_tokens_to_ids(names) == list(range(n_bpe, n_bpe + 5))
    special = {t["content"]: t["special"] for t in raw["added_tokens"]}
    assert special == dict(zip(names, [True, True, True, False, False], strict=True))
    assert len(tok) == n_bpe + 5
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size > len(tok)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_roundtrip_matches_raw(tiny_dir, ref):
    from tokenizers import Tokenizer

    _, tok, _ = ref
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    texts = [
        "First, compute 12 + 7 = 19.\n\nThen 19 * 2 = 38.\n\n",
        "<think>\nWait, that's wrong.\n\n</think>\n\nThe answer is \\boxed{5}.",
        "héllo wörld 中文 😀  double  spaces\r\n\ttab",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


def test_chat_template_generation_prompt(ref):
    _, tok, _ = ref
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert not tok.apply_chat_template(msgs, tokenize=False).endswith("<think>\n")


def test_config_is_legacy_qwen2(tiny_dir, ref):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["rope_theta"] == 10000.0 and cfg["torch_dtype"] == "float32"
    assert cfg["hidden_size"] == 256 and cfg["num_hidden_layers"] == 4
    model, _, _ = ref
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    norm = model.model.norm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))


def test_sharded_untied_headless(tmp_path):
    out = build_tiny_metastone(tmp_path / "s", seed=3, shards=3, head=False, tied=False, n_layers=2)
    shards = sorted(out.glob("model-*-of-00003.safetensors"))
    assert len(shards) == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert "lm_head.weight" in index["weight_map"]
    assert not (out / "score_module.pt").exists()


def test_script_entry_point(tmp_path):
    main([str(tmp_path / "c"), "--seed", "1", "--layers", "2", "--no-head"])
    assert (tmp_path / "c" / "model.safetensors").exists()
    assert not (tmp_path / "c" / "score_module.pt").exists()


def test_features_are_layer_l_minus_2_output(ref):
    model, tok, _ = ref
    ids = tok.encode("First, compute 12 + 7 = 19.\n\n", add_special_tokens=False)
    captured = {}
    layer = model.model.layers[model.config.num_hidden_layers - 2]
    hook = layer.register_forward_hook(
        lambda _m, _i, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        logits, feats = reference_forward(model, ids)
    finally:
        hook.remove()
    assert logits.shape == (len(ids), model.config.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(feats, captured["h"][0].detach().numpy())


def test_head_scores_spread(ref):
    model, tok, head = ref
    ids = tok.encode(
        "Question: Alice has 12 apples.\n<think>\nFirst, compute 12 + 7 = 19.\n\n"
        "Then Bob has 3 books and gets 4 more, so 3 + 4 = 7.\n\n</think>\n\nThe answer is 7.",
        add_special_tokens=False,
    )
    _, feats = reference_forward(model, ids)
    scores = np.array(head_scores(head, feats))
    assert scores.min() < 0.3 and scores.max() > 0.7, (scores.min(), scores.max())


# --- the scored-position rule on hand-built ids ------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([X, X, S, X, S, S, S, X, S], [1, 3, 7]),  # runs count once, at their first delimiter
        ([S, X, S], [1]),  # a delimiter at j=0 has no feature
        ([X, S], []),  # i=0 is below start+1 when there is no <think>
        ([X, T, S, X, S, E, X, S], [3]),  # right after <think>: skipped; after </think>: dropped
        ([T, S, S, X, S], [3]),  # a run starting right after <think> is skipped whole
        ([T, X, S, T, X, S, X, S], [1, 4, 6]),  # two <think>: start = 0
        ([X, T, X, S, T, S, X, S], [2, 6]),  # ...but a delimiter after either <think> is skipped
        ([T, X, S, E, X, S, E, X, S], [1, 4, 7]),  # two </think>: end = len
        ([T, X, X, S, E], [2]),  # i = end - 1 is kept
        ([T, X, E, S], []),  # i = end is dropped
        ([X, X, S, T, X, S], [4]),  # i < start + 1 is dropped
        ([], []),
    ],
)
def test_scored_positions(ids, expected):
    assert scored_positions(ids, [S], T, E) == expected


def test_scored_positions_multi_token_delimiter():
    assert scored_positions([X, X, S, 8, X, 8], [S, 8], T, E) == [1, 4]


def test_trajectory_score():
    assert trajectory_score([]) == 0.0
    assert trajectory_score([0.5, 0.125]) == pytest.approx(0.25, rel=1e-12)
    assert trajectory_score([0.0, 1.0]) == pytest.approx(1e-5, rel=1e-9)


# --- reference_score on real text --------------------------------------------------------------


def _pieces_text(tok, pieces):
    """Join pieces, check their encodings concatenate, return (text, start index of each piece)."""
    starts, ids = [], []
    for p in pieces:
        starts.append(len(ids))
        ids += tok.encode(p, add_special_tokens=False)
    text = "".join(pieces)
    assert tok.encode(text, add_special_tokens=False) == ids
    return text, starts, ids


@torch.no_grad()
def _layer_output(model, ids: list[int], layer: int) -> np.ndarray:
    """[T, C] float32: decoder layer `layer`'s output, hooked out of the HF model (SPEC §1's
    "residual-stream output of decoder layer L-2"), not read from `hidden_states`."""
    captured = {}
    hook = model.model.layers[layer].register_forward_hook(
        lambda _m, _i, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        hook.remove()
    return captured["h"][0].float().numpy()


def _numpy_head(tiny_dir: Path, features: np.ndarray) -> np.ndarray:
    """sigmoid(Linear(ReLU(Linear(x)))) in float64 numpy from score_module.pt's raw arrays (SPEC
    §1: dropout off at inference)."""
    state = torch.load(tiny_dir / "score_module.pt", map_location="cpu", weights_only=True)
    w = {k: v.double().numpy() for k, v in state.items()}
    hidden = np.maximum(features.astype(np.float64) @ w["0.weight"].T + w["0.bias"], 0.0)
    logits = (hidden @ w["3.weight"].T + w["3.bias"])[:, 0]
    return 1.0 / (1.0 + np.exp(-logits))


def test_reference_score_positions_and_values(tiny_dir, ref):
    """`reference_score` against values made here from the spec, not from its own parts: positions
    counted by hand from the pieces, features hooked out of layer L-2 of the float32 HF model, the
    head applied in numpy. Tolerance 1e-6 on scores (float32 head vs float64)."""
    model, tok, head = ref
    pieces = [
        "Question: what is 3 + 4 - 2?\n",
        "<think>",
        ".\n\n",  # right after <think>: not scored
        "First, compute 3 + 4 = 7",
        ".\n\n",
        ".\n\n",  # second of a run: not scored
        "Then 7 - 2 = 5",
        ".\n\n",
        "</think>",
        "\n\nSo the answer is 5",
        ".\n\n",  # after </think>: not scored
    ]
    text, starts, ids = _pieces_text(tok, pieces)
    result = reference_score(model, tok, head, text)
    assert result["token_ids"] == ids
    positions = [starts[4] - 1, starts[7] - 1]  # the tokens just before the two scored delimiters
    assert result["positions"] == positions
    feats = _layer_output(model, ids, model.config.num_hidden_layers - 2)[positions]
    expected = _numpy_head(tiny_dir, feats)
    diff = float(np.abs(np.asarray(result["step_scores"]) - expected).max())
    assert diff < 1e-6, f"max |reference step score - numpy head on layer L-2| = {diff:.3g}"
    assert expected.min() > 1e-3 and expected.max() < 1 - 1e-3  # not saturated: the values tell
    assert result["score"] == pytest.approx(math.sqrt(expected[0] * expected[1]), rel=1e-6)


def test_reference_score_no_steps(ref):
    model, tok, head = ref
    result = reference_score(model, tok, head, "<think>.\n\nno steps here</think>")
    assert result["positions"] == [] and result["step_scores"] == [] and result["score"] == 0.0
