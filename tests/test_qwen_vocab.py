"""Qwen's real vocabulary (issue 15): llama.cpp on the converted file against HF `tokenizers` and
transformers, with the tokenizer's NFC normalization and its own special tokens.

The fixture (tests/fixtures/make_qwen_vocab.py) has Qwen's 151,643 BPE ranks, its added tokens,
Qwen2.5-Instruct's chat template and tiny random weights with an SPRM head.
"""

from __future__ import annotations

import contextlib
import json
import unicodedata

import numpy as np
import pytest
from fuzz_models import rewrite
from qwen_corpus import corpus

from conftest import cli_json
from edge_metastone import keys
from edge_metastone.chat import ChatTemplate
from edge_metastone.converters.convert import convert
from edge_metastone.converters.vocab import normal_form
from edge_metastone.engine.engine import Engine
from edge_metastone.engine.llama import Model
from edge_metastone.errors import BadCheckpointError, BadModelFileError
from edge_metastone.modelfile.copy import write_model_copy
from edge_metastone.modelfile.read import open_model_file
from edge_metastone.normalization import NORMAL_FORMS, normalize
from edge_metastone.types import FinishReason, GenerationSettings, SamplingSettings
from fixtures.make_qwen_vocab import ADDED_TOKENS, N_RANKS, STEP_ID, VOCAB_SIZE
from reference_scorer import load_reference, reference_score

SCORE_TOL = 1e-4  # F32 file, flash attention off, F32 KV cache
THINK, THINK_END = N_RANKS + 24, N_RANKS + 25


@pytest.fixture(scope="module")
def hf_tok(qwen_hf):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen_hf / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference(qwen_hf):
    return load_reference(qwen_hf)


@pytest.fixture(scope="module")
def engine(qwen_gguf):
    with Engine(qwen_gguf, parity=True) as e:
        yield e


@contextlib.contextmanager
def without_normalizer(model: Model):
    """The model as it tokenized before issue 15: text straight to llama.cpp."""
    saved, model.normalizer = model.normalizer, None
    try:
        yield
    finally:
        model.normalizer = saved


def mismatches(model: Model, hf_tok, texts, *, parse_special: bool = True) -> list[tuple]:
    out = []
    for text in texts:
        ref = hf_tok.encode(text, add_special_tokens=False).ids
        ours = model.tokenize(text, parse_special=parse_special)
        if ours != ref:
            out.append((text, ours, ref))
    return out


# --- the file ---------------------------------------------------------------------------------


def test_file_records_the_tokenizer_as_transformers_reads_it(qwen_gguf, reference):
    _, tok, _ = reference
    mf = open_model_file(qwen_gguf)
    assert mf.n_vocab == VOCAB_SIZE and mf.step_token_ids == (STEP_ID,)
    assert (mf.think_start_id, mf.think_end_id) == (THINK, THINK_END)
    assert mf.normalizer == "NFC"
    # the template's variables are the tokenizer's own: no bos_token (config.json's
    # bos_token_id 151643 is not the tokenizer's), eos <|im_end|>, pad <|endoftext|>
    assert mf.template_variables == tok.special_tokens_map
    assert mf.bos_token == "" and "bos_token" not in mf.template_variables
    with Model(qwen_gguf) as m:
        assert m.normalizer == "NFC"
        for k, (text, _) in enumerate(ADDED_TOKENS):
            assert m.tokenize(text) == [N_RANKS + k]


# --- tokenization parity ----------------------------------------------------------------------


def test_tokenization_matches_hf_tokenizers_on_the_corpus(engine, hf_tok):
    """llama.cpp (through Model.tokenize) == HF tokenizers on every corpus text, markup parsed."""
    texts = corpus()
    assert len(texts) >= 400
    bad = mismatches(engine.model, hf_tok, texts)
    with without_normalizer(engine.model):
        bad_before = mismatches(engine.model, hf_tok, texts)
    print(f"\n{len(texts)} texts: {len(bad_before)} mismatches unnormalized, {len(bad)} now")
    assert not bad, f"{len(bad)} of {len(texts)} texts differ; first: {bad[0]}"
    # the corpus exercises normalization: straight to llama.cpp, decomposed text tokenizes apart
    assert len(bad_before) >= 20
    assert all(not unicodedata.is_normalized("NFC", text) for text, _, _ in bad_before)


def test_plain_text_tokenization_matches_hf_tokenizers(engine, hf_tok):
    """The plain-text path (no special parsing) on texts without added-token spellings."""
    added = [t for t, _ in ADDED_TOKENS]
    texts = [t for t in corpus() if not any(a in t for a in added)]
    bad = mismatches(engine.model, hf_tok, texts, parse_special=False)
    assert not bad, f"{len(bad)} of {len(texts)} texts differ; first: {bad[0]}"


def test_normalization_keeps_added_tokens_apart(engine, hf_tok):
    """U+0338 after `>` composes to `≯` under NFC; HF splits `<think>` out first, and so do we."""
    text = "a.\n\n<think>\u0338 b"
    assert "<think\u226f" in unicodedata.normalize("NFC", text)  # whole-text NFC loses the tag
    ours = engine.model.tokenize(text)
    assert ours == hf_tok.encode(text, add_special_tokens=False).ids
    assert THINK in ours
    assert engine.model.tokenize(unicodedata.normalize("NFC", text)).count(THINK) == 0


# --- chat template ----------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a careful reasoner."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [SYSTEM, {"role": "user", "content": "What is 12 + 7?"}],
    [
        SYSTEM,
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [{"role": "user", "content": "Le cafe\u0301 cou\u0302te 3 \u20ac.\n\nCombien pour 2 ?"}],
    [{"role": "user", "content": "\u0301starts with a combining mark"}],
    [{"role": "user", "content": "\u1100\u1161\u11a8 \uac01 \u1112\u1161\u11ab"}],
    [{"role": "user", "content": "中文：计算 12 + 7。\n\n然后验证。"}],
    [{"role": "user", "content": "👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 👍🏽"}],
    [{"role": "user", "content": "def f(x):\r\n\treturn x + 1\r\n"}],
    [{"role": "user", "content": "   spaces   and\n\n\n  newlines  "}],
    [{"role": "user", "content": r"Prove $\sum_{k=1}^{n} k = \frac{n(n+1)}{2}$."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [
        {"role": "user", "content": "first"},
        {"role": "system", "content": "a later system message"},
        {"role": "user", "content": "second"},
    ],
    [
        {"role": "user", "content": "What's the weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"z": "<city>", "a": "caf\u00e9"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny, 25 \u00b0C"},
        {"role": "tool", "content": "wind 3 m/s"},
        {"role": "user", "content": "Thanks."},
    ],
    [{"role": "user", "content": "1234567890123456789 and 3.14159265358979"}],
    [{"role": "user", "content": "Steps.\n\nMore.\n\n.\n\nend"}],
]


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_matches_apply_chat_template(engine, reference, case):
    """Qwen2.5-Instruct's template: our sandboxed render and its ids == transformers'. The text
    `encode_chat` feeds the model carries each message in the tokenizer's normal form (NFC here:
    the control-token check runs on what the tokenizer will see), as transformers' tokenizer
    reads its own render: the ids agree exactly, the text after NFC."""
    _, tok, _ = reference
    msgs = CONVERSATIONS[case]
    want_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want_ids = _ids(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    text, ids = engine.encode_chat(msgs)
    assert engine.render(msgs) == want_text  # the template alone: exactly transformers' render
    assert text == unicodedata.normalize("NFC", want_text)
    assert ids == want_ids
    no_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert engine.template.render(msgs, add_generation_prompt=False) == no_prompt


BOS_TEMPLATE = (
    "{{ bos_token }}{% if bos_token is defined %}[bos defined]{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if pad_token is defined %}[pad {{ pad_token }}]{% endif %}"
    "{% if unk_token is defined %}[unk]{% endif %}"
    "{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_template_variables_are_the_tokenizers_own(qwen_gguf, reference):
    """A template that reads bos_token/eos_token/pad_token renders as transformers renders it:
    config.json's bos_token_id names <|endoftext|>, but the tokenizer defines no BOS."""
    _, tok, _ = reference
    msgs = [{"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(
        msgs, chat_template=BOS_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    mf = open_model_file(qwen_gguf)
    ours = ChatTemplate(BOS_TEMPLATE, variables=mf.template_variables).render(msgs)
    assert ours == want == "<user>hi<|im_end|>[pad <|endoftext|>]1<assistant>"
    stale = ChatTemplate(BOS_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    assert stale.render(msgs) != want  # what issue 15 found


def test_files_without_the_keys_work_as_before(tiny_gguf, tmp_path):
    """A file made before issue 15: no normalization, BOS and EOS from the ids."""
    old = tmp_path / "old.gguf"
    drop = ("metastone.tokenizer.normalizer", "metastone.tokenizer.special_tokens")
    rewrite(tiny_gguf("f32"), old, lambda name, t, v: None if name in drop else (t, v))
    mf = open_model_file(old)
    assert mf.special_tokens is None and mf.normalizer is None
    assert mf.template_variables == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    with Model(old) as m, Model(tiny_gguf("f32")) as new:
        assert m.normalizer is None and new.normalizer == "NFC"
        text = "cafe\u0301 <think>"
        assert m.tokenize(text) != new.tokenize(text)
        with without_normalizer(new):
            assert m.tokenize(text) == new.tokenize(text)


# --- scoring ----------------------------------------------------------------------------------


def _scored_texts(tok) -> list[str]:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "A cafe\u0301 sells 3 cups at 2 \u20ac. Total?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return [
        prompt + "<think>\nThe cafe\u0301 sells 3 cups.\n\nEach costs 2, so 3 * 2 = 6.\n\n"
        "Check: 6 / 2 = 3.\n\n</think>\n\\boxed{6}",
        prompt + "<think>\n\u1100\u1161\u11a8 first.\n\nThen e\u0301, o\u0308 and A\u030a.\n\n"
        "Vie\u0323\u0302t.\n\nq\u0307\u0323.\n\n</think>\ndone",
        "<think>\u0338 a mark after the tag.\n\nre\u0301sume\u0301.\n\n=\u0338.\n\n</think>",
    ]


def test_score_matches_reference_with_nfd_in_the_think_window(engine, reference):
    """Engine.score_text == the HF float32 reference scorer, NFD text in the think window."""
    model, tok, head = reference
    for text in _scored_texts(tok):
        ref = reference_score(model, tok, head, text)
        ours = engine.score_text(text)
        assert ours.token_ids == ref["token_ids"]
        assert ours.positions == ref["positions"] and len(ours.positions) >= 3
        diff = float(np.abs(np.subtract(ours.step_scores, ref["step_scores"])).max())
        assert diff < SCORE_TOL, f"max |step score diff| {diff:.3e} >= {SCORE_TOL}"
        assert abs(ours.score - ref["score"]) < SCORE_TOL, (ours.score, ref["score"])
        with without_normalizer(engine.model):
            before = engine.score_text(text)
        assert before.token_ids != ref["token_ids"]  # what issue 15 found


def test_score_cli_on_nfd_text(qwen_gguf, reference, tmp_path):
    """`edge-metastone score --json` as a user runs it."""
    model, tok, head = reference
    text = _scored_texts(tok)[0]
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    out = cli_json("score", "--model", str(qwen_gguf), "--text-file", str(path), "--json")
    ref = reference_score(model, tok, head, text)
    assert out["positions"] == ref["positions"]
    diff = float(np.abs(np.subtract(out["step_scores"], ref["step_scores"])).max())
    assert diff < SCORE_TOL, f"max |step score diff| {diff:.3e}"


# --- stop strings -----------------------------------------------------------------------------


def test_stop_strings_match_in_the_tokenizers_normal_form(engine, hf_tok):
    """A decomposed stop string stops text the model writes composed (` café` is one token)."""
    (cafe,) = hf_tok.encode(" café", add_special_tokens=False).ids
    prompt = engine.tokenize("Where?")
    sampling = SamplingSettings(temperature=0.0, logit_bias=((cafe, 100.0),))
    settings = GenerationSettings(max_new_tokens=6, stop=("cafe\u0301",))
    (cand,) = engine.generate_all(prompt, 1, sampling, settings)
    assert cand.finish_reason is FinishReason.STOP and cand.text == ""
    with without_normalizer(engine.model):
        (raw,) = engine.generate_all(prompt, 1, sampling, settings)
    assert raw.finish_reason is FinishReason.LENGTH and raw.text == " café" * 6


# --- the converter's normalizer rule ----------------------------------------------------------

SAMPLES = ["cafe\u0301", "\u212b", "ﬁ ﬀ ²", "Ｅ\u0301", "\u1100\u1161\u11a8", "q\u0307\u0323", "㎏"]


@pytest.mark.parametrize(
    "steps",
    [[a] for a in NORMAL_FORMS]
    + [[a, b] for a in NORMAL_FORMS for b in NORMAL_FORMS]
    + [["NFKD", "NFC", "NFD"]],
)
def test_a_sequence_of_normal_forms_is_one_normal_form(steps):
    """normal_form(Sequence) normalizes as HF tokenizers' own Sequence does."""
    from tokenizers import normalizers

    node = {"type": "Sequence", "normalizers": [{"type": s} for s in steps]}
    hf = normalizers.Sequence([getattr(normalizers, s)() for s in steps])
    form = normal_form(node)
    for text in SAMPLES:
        assert normalize(text, form) == hf.normalize_str(text), (steps, form, text)


def test_normalizers_the_runtime_cannot_repeat_are_refused(tiny_hf, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for f in tiny_hf.iterdir():
        (hf_dir / f.name).symlink_to(f)
    tj = json.loads((tiny_hf / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(BadCheckpointError, match="normalizer 'Lowercase' is not supported"):
        convert(hf_dir, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        (keys.TOKENIZER_NORMALIZER, "NFX", "not one of"),
        (keys.TOKENIZER_SPECIAL_TOKENS, "{not json", "not valid JSON"),
        (keys.TOKENIZER_SPECIAL_TOKENS, '{"messages": "x"}', "names 'messages'"),
        (keys.TOKENIZER_SPECIAL_TOKENS, '{"bos_token": 1}', "not a string"),
    ],
)
def test_bad_tokenizer_keys_are_refused(tiny_gguf, tmp_path, key, value, needle):
    path = write_model_copy(tiny_gguf("f32"), tmp_path / "bad.gguf", extra={key: value})
    with pytest.raises(BadModelFileError, match=needle):
        open_model_file(path)
