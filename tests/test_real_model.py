"""A real pretrained model through the whole pipeline: SmolLM2-135M-Instruct, Llama architecture,
Q4_1 (tests/real_model.py). Its tokenizer, chat template, layer-(L-2) features and logits against
transformers on the same GGUF, then `reason` and `train-sprm` end to end.

Tolerances (measured here, 2 threads, flash attention off, F32 KV cache, as the reference tests
do for qwen2; each assertion prints the max difference):
- the control, the file dequantized to F32 and run by llama.cpp, equals transformers' float32
  forward: measured 2.5e-6 (features, relative per token) and 2.3e-6 (logits, of their range);
  asserted 1e-4 for both. The capture of `l_out-{L-2}` is exact.
- the Q4_1 file itself: llama.cpp multiplies Q4_1 weights with activations quantized to 8 bits
  (its Q8_1 dot product), transformers with float32 activations. Measured on MESSAGES (63 tokens;
  the same on 76 with one more turn): features at
  L-2 differ by 2.7% (median token) and 6.3% (worst token) of the row norm, 1.0% at layer 0;
  logits by up to 2.5 (their std is 7.4); the log-probability of the text's own next token by up
  to 0.35; greedy next tokens agree on 97% of the positions. Asserted: features 5% median / 10%
  worst, next-token log-probability 0.6, logits 4.0, greedy agreement 90%.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from real_model import RealModelMissing, smollm2_gguf, write_f32_copy

from conftest import run_cli
from edge_metastone.chat import ChatTemplate
from edge_metastone.engine.engine import Engine, step_rule
from edge_metastone.engine.llama import Model
from edge_metastone.engine.scoring import forward_features
from edge_metastone.modelfile.read import SUPPORTED_ARCHS, open_model_file
from edge_metastone.sprm import line_delimiters
from edge_metastone.training.collect import CollectSettings, Problem, prompt_ids, sample_problem
from edge_metastone.types import FinishEvent

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "user", "content": "Add the numbers, one step per line.\n3+5+1"},
    {"role": "assistant", "content": "3+5=8\n8+1=9\nAnswer: 9"},
]
CORPUS = [
    "What is (17+25)*3-40? 17+25=42.\n\n42*3=126.\n\n126-40=86.",
    "0 1 12 123 1234 12345 3.14159 -2.5e-3 1,000,000 0x1F 007",
    "naïve café résumé Ünïcödé ß ﬁ Å Å (NFC vs NFD)",
    "中文字符 日本語のテキスト 한국어 العربية עברית ελληνικά русский",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷 math ∑∫√∞ ≤ ≥ ≠",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "<|endoftext|>text<|im_end|> and <think>x</think> spelled out",
    "tabs\tand  double  spaces\n\n\nnew lines\r\nwindows   \n  indented",
    "def f(x):\n    return x ** 2  # code\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ü 😀"}],
    MESSAGES,
    [*MESSAGES, {"role": "user", "content": "And 2+2+2?"}],
]


@pytest.fixture(scope="session")
def smol() -> Path:
    """The pinned SmolLM2 GGUF (skips, naming the reason, when it cannot be had)."""
    try:
        return smollm2_gguf()
    except RealModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf(smol: Path):
    """transformers' tokenizer and float32 model from the same GGUF, loaded once, offline."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tok = transformers.AutoTokenizer.from_pretrained(smol.parent, gguf_file=smol.name)
        _digits_first(tok)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smol.parent, gguf_file=smol.name, dtype=torch.float32
        ).eval()
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return tok, model


def _digits_first(tok) -> None:
    """Give transformers' tokenizer the pre-tokenizer this file names (`tokenizer.ggml.pre`
    `smollm`: SmolLM2's tokenizer.json splits every digit first, then GPT-2's byte-level regex;
    llama.cpp's SMOLLM pre-tokenizer does both). transformers' GGUF conversion keeps only the
    byte-level step, so on whitespace before a digit (`.\\n\\n42`) it alone splits `\\n\\n`."""
    from tokenizers import pre_tokenizers

    assert tok.backend_tokenizer.pre_tokenizer.__class__.__name__ == "ByteLevel"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


@pytest.fixture(scope="module")
def llama(smol: Path):
    with Model(smol) as m:
        yield m


def hf_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def hf_chat(tok, messages, *, tokenize: bool, add_generation_prompt: bool = True):
    out = tok.apply_chat_template(
        messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
    )
    if tokenize and hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return out


def hf_forward(model, ids: list[int], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (the output of decoder layer `layer`) [T, C] and logits [T, V]."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0].numpy(), out.logits[0].numpy()


def row_rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_the_real_model_is_accepted(smol):
    mf = open_model_file(smol)
    assert (mf.arch, mf.n_layers, mf.n_embd, mf.n_heads, mf.n_kv_heads) == ("llama", 30, 576, 9, 3)
    assert mf.head is None and "llama" in SUPPORTED_ARCHS


def test_tokenization_equals_hf(llama, hf):
    tok, _ = hf
    for text in CORPUS:
        ours = llama.tokenize(text, parse_special=True)
        assert ours == hf_ids(tok, text), text
        assert llama.detokenize(ours) == tok.decode(ours), text


def test_chat_template_equals_apply_chat_template(smol, hf):
    tok, _ = hf
    mf = open_model_file(smol)
    template = ChatTemplate(mf.chat_template, variables=mf.template_variables)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = template.render(conv, add_generation_prompt=gen)
            assert ours == hf_chat(tok, conv, tokenize=False, add_generation_prompt=gen)


def test_chat_ids_equal_apply_chat_template(smol, hf):
    tok, _ = hf
    with Engine(smol, n_threads=2) as engine:
        for conv in CONVERSATIONS:
            _, ids = engine.encode_chat(conv)
            assert ids == list(hf_chat(tok, conv, tokenize=True))


def test_steps_are_lines(llama, smol):
    """No step ids in the file and `.\\n\\n` is two tokens here: a step ends at each line."""
    rule = step_rule(open_model_file(smol), llama)
    newline, blank, period = (llama.tokenize(t, parse_special=False) for t in ("\n", "\n\n", "."))
    assert newline[0] in rule.step_token_ids and blank[0] in rule.step_token_ids
    assert period[0] not in rule.step_token_ids
    ids = llama.tokenize("3+5=8\n8+1=9\n\nAnswer: 9.", parse_special=False)
    # the token before each line's end: `8` and `9` (a run of newlines counts once)
    assert [llama.detokenize([ids[i]]) for i in rule.scored_positions(ids)] == ["8", "9"]


def test_line_delimiters():
    vocab = [(0, "\n"), (1, "\n\n"), (2, ".\n"), (3, " \n  "), (4, "ab\n"), (5, "."), (6, "x")]
    assert line_delimiters(vocab) == [0, 1, 2, 3]


def test_f32_copy_features_and_logits_equal_hf(smol, hf, tmp_path_factory):
    """The control: with the weights in F32 both sides compute the same float32 forward."""
    tok, model = hf
    path = write_f32_copy(smol, tmp_path_factory.mktemp("smol-f32") / "smol-f32.gguf")
    ids = list(hf_chat(tok, MESSAGES, tokenize=True, add_generation_prompt=False))
    with Model(path) as m:
        layer = m.n_layer - 2
        feats, logits = forward_features(m, ids, layer, parity=True, want_logits=True)
    ref, ref_logits = hf_forward(model, ids, layer)
    rel = row_rel(feats, ref).max()
    logit_rel = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    assert rel < 1e-4, f"features: max relative difference {rel:.2e}"
    assert logit_rel < 1e-4, f"logits: max difference {logit_rel:.2e} of their range"
    path.unlink()


def test_q4_1_features_and_logits_within_tolerance(llama, hf):
    tok, model = hf
    ids = list(hf_chat(tok, MESSAGES, tokenize=True, add_generation_prompt=False))
    layer = llama.n_layer - 2
    feats, logits = forward_features(llama, ids, layer, parity=True, want_logits=True)
    ref, ref_logits = hf_forward(model, ids, layer)
    rel = row_rel(feats, ref)
    assert np.median(rel) < 0.05, f"features: median relative difference {np.median(rel):.4f}"
    assert rel.max() < 0.10, f"features: max relative difference {rel.max():.4f}"
    diff = np.abs(logits - ref_logits).max()
    assert diff < 4.0, f"logits: max difference {diff:.3f}"
    nxt = np.array(ids[1:])[:, None]
    lp = np.take_along_axis(log_softmax(logits[:-1]), nxt, 1)
    ref_lp = np.take_along_axis(log_softmax(ref_logits[:-1]), nxt, 1)
    lp_diff = np.abs(lp - ref_lp).max()
    # the worst position depends on the CPU's q4_1 kernels: 0.63 on an AVX2-only EPYC, under 0.6
    # with AVX-512; the median (0.047 there) is the tight check
    lp_median = np.median(np.abs(lp - ref_lp))
    assert lp_median < 0.1, f"next-token log-probability: median difference {lp_median:.3f}"
    assert lp_diff < 0.75, f"next-token log-probability: max difference {lp_diff:.3f}"
    agree = (logits.argmax(1) == ref_logits.argmax(1)).mean()
    assert agree >= 0.9, f"greedy next tokens agree on {agree:.2%}"


def test_reason_end_to_end(smol):
    proc = run_cli(
        "reason", "--model", str(smol), "--effort", "low", "--max-new-tokens", "24",
        "--seed", "3", "--threads", "2", "--json", "What is 2+3?",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["k"] == 2 and len(out["candidates"]) == 2
    assert all(0 < c["tokens"] <= 24 for c in out["candidates"])
    assert "<|im_start|>assistant\n" in out["prompt_text"]


def test_inspect_names_the_architecture(smol):
    proc = run_cli("inspect", "--json", str(smol))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "llama" in json.dumps(info) and "576" in json.dumps(info)


def test_batch_end_to_end(smol, tmp_path):
    """`batch` on the real model: raw few-shot prompts with gold answers, one record per line in
    input order, each with its candidates and the limit it used, and a summary that counts them."""
    shots = "Question: 2 + 3 + 4\nStep 1: 2 + 3 = 5\nStep 2: 5 + 4 = 9\nAnswer: 9\n\n"
    lines = [
        {"id": f"q{i}", "prompt": f"{shots}Question: {a} + {b} + {c}\n", "answer": a + b + c}
        for i, (a, b, c) in enumerate([(1, 2, 3), (4, 4, 1), (6, 2, 5)])
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_cli(
        "batch", str(src), "-o", str(out), "--model", str(smol), "--raw", "--effort", "low",
        "--max-new-tokens", "40", "--stop", "\\n\\n", "--threads", "2", "--no-progress", "--json",
        "--full",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["q0", "q1", "q2"]
    for r in records:
        assert r["k"] == 2 and len(r["candidates"]) == 2, r
        assert all(0 < c["tokens"] <= 40 for c in r["candidates"]), r
        assert isinstance(r["correct"], bool)
        assert "\n\n" not in r["text"] and r["text"].startswith("Step 1:"), r["text"]
    # the few-shot separator ends candidates (`--stop '\n\n'`, typed as on a command line)
    ends = [c["finish_reason"] for r in records for c in r["candidates"]]
    assert "stop" in ends, ends
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    low = summary["modes"]["low"]
    assert summary["records"] == 3 and summary["errors"] == 0 and low["with_answer"] == 3
    assert low["accuracy"] == sum(r["correct"] for r in records) / 3
    assert low["tokens"] == sum(r["tokens"] for r in records)


def test_serve_end_to_end(smol):
    """`serve` on the real model through the official openai client: a completion, and a stream
    whose token events rebuild every candidate and whose result names the chosen one."""
    import openai
    from server_process import ServerProcess

    with ServerProcess("--model", str(smol), "--max-new-tokens", "24", "--threads", "2") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        name = c.models.list().data[0].id
        assert "SmolLM2" in name
        msgs = [{"role": "user", "content": "What is 2+3?"}]
        resp = c.chat.completions.create(
            model=name, messages=msgs, seed=3, extra_body={"effort": "low"}
        )
        ext = resp.model_extra["metastone"]
        assert ext["k"] == 2 and resp.choices[0].message.content
        assert resp.usage.completion_tokens == sum(x["tokens"] for x in ext["candidates"])
        texts: dict[int, str] = {}
        result = None
        for chunk in c.chat.completions.create(
            model=name, messages=msgs, seed=3, stream=True, extra_body={"effort": "low"}
        ):
            more = (chunk.model_extra or {}).get("metastone") or {}
            for ev in more.get("events", []):
                if ev["type"] in ("token", "finish"):
                    texts[ev["candidate"]] = texts.get(ev["candidate"], "") + ev["text"]
            result = more.get("result", result)
        assert result is not None
        assert [texts[i] for i in range(2)] == [x["text"] for x in result["candidates"]]
        assert srv.stop() == 0
        assert "Traceback" not in srv.stderr, srv.stderr


TRAIN_PROMPT = (
    "Add the numbers, one step per line, then give the answer.\n\n2+3+4\n2+3=5\n5+4=9\n"
    "Answer: 9\n\n{q}"
)


def test_train_sprm_writes_a_sidecar_head_that_scores(smol, hf, tmp_path):
    """train-sprm on the real model (4 problems x 4 samples: plumbing, not quality), then
    `score` with its sidecar head against the head on transformers' features (5 epochs leave
    the head nearly flat, so this checks the plumbing; feature parity is the test above)."""
    tok, model = hf
    data = tmp_path / "problems.jsonl"
    problems = [("6+1+2", 9), ("3+5+1", 9), ("1+1+5", 7), ("2+2+2", 6)]
    data.write_text(
        "".join(json.dumps({"prompt": TRAIN_PROMPT.format(q=q), "answer": a}) + "\n"
                for q, a in problems)
    )  # fmt: skip
    side = tmp_path / "smol.sprm.gguf"
    proc = run_cli(
        "train-sprm", "--model", str(smol), "--data", str(data), "-o", str(side),
        "--samples", "4", "--max-new-tokens", "32", "--epochs", "5", "--val-split", "0.25",
        "--threads", "2", "--no-progress", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["train"]["problems"] == 3 and report["train"]["steps"] > 0
    mf = open_model_file(smol, side)
    assert mf.head is not None and mf.head.hidden_size == 576 and mf.head.feature_layer == 28
    assert mf.head_source == side and 198 in mf.step_token_ids  # "\n"

    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    proc = run_cli(
        "score", "--model", str(smol), "--head", str(side), "--text-file", str(text_file), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)
    ids = hf_ids(tok, text)
    from edge_metastone.sprm import StepRule

    rule = StepRule.of(mf.step_token_ids, mf.think_start_id, mf.think_end_id)
    assert scored["positions"] == rule.scored_positions(ids)
    ref, _ = hf_forward(model, ids, 28)
    ref_scores = mf.head.scores(ref[scored["positions"]])
    diff = np.abs(np.array(scored["step_scores"]) - ref_scores).max()
    assert diff < 0.05, f"step scores: max difference {diff:.2e} from the head on HF features"

    # the combined selector, fitted on the held-out problem and recorded, reaches `reason`
    sel = json.loads(mf.policy_keys.selector)
    assert sel == report["selector"] and sel["measured"]["problems"] == 1
    assert (
        mf.policy_keys.default_strategy
        == report["default_strategy"]
        == sel["measured"]["default_strategy"]
    )
    proc = run_cli(
        "reason", "--model", str(smol), "--head", str(side), "--effort", "low", "--json",
        "--max-new-tokens", "24", "--seed", "3", "--threads", "2", "What is 2+3?",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["strategy"] == report["default_strategy"]
    proc = run_cli(
        "reason", "--model", str(smol), "--head", str(side), "--effort", "low", "--json",
        "--strategy", "combined-vote", "--max-new-tokens", "24", "--threads", "2", "What is 2+3?",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["strategy"] == "combined-vote"


class Recording:
    """A backend that keeps the candidates it generated."""

    def __init__(self, backend) -> None:
        self.backend, self.cands = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def generate(self, *args, **kw):
        for ev in self.backend.generate(*args, **kw):
            if isinstance(ev, FinishEvent):
                self.cands.append(ev.result)
            yield ev


def test_collection_keeps_only_the_steps_a_candidate_wrote(smol):
    """SmolLM2 has no think window, so every line of the prompt is a scored step (SPEC §1); the
    training data must hold only the candidates' own steps (the prompt's are the same for the
    right and the wrong ones)."""
    problem = Problem(TRAIN_PROMPT.format(q="6+1+2"), "9")
    settings = CollectSettings(samples=2, max_new_tokens=24, temperature=0.7)
    with Engine(smol, n_threads=2) as engine:
        rec = Recording(engine)
        data = sample_problem(rec, problem, settings)
        ids = prompt_ids(engine, problem, settings)
    rec.cands.sort(key=lambda c: c.index)  # they finish in any order; the data is by index
    n_prompt = len(engine.rule.scored_positions(ids))
    assert n_prompt >= 5  # the prompt's own lines
    wrote = [sum(i >= len(ids) - 1 for i in c.step_positions) for c in rec.cands]
    assert list(data.steps) == wrote, (list(data.steps), wrote, n_prompt)
    for c, feats in zip(rec.cands, data.candidate_features(), strict=True):
        assert np.array_equal(feats, c.step_features[len(c.step_positions) - len(feats) :])
    assert [len(v) for v in data.candidate_logprobs()] == [len(c.token_logprobs) for c in rec.cands]


def test_stated_head_size_is_used(tiny_gguf, tmp_path):
    """Gemma states `{arch}.attention.key_length` (not hidden size / heads): the KV size follows it,
    and heads that do not divide the hidden size are then no error."""
    import gguf
    from fuzz_models import rewrite

    from edge_metastone.engine.engine import model_facts

    V = gguf.GGUFValueType
    base = tiny_gguf("f32")
    mf = open_model_file(base)
    out = tmp_path / "keylen.gguf"
    # heads a multiple of the KV heads that do not divide the hidden size
    n_heads = next(h for h in range(mf.n_kv_heads, 1 << 12, mf.n_kv_heads) if mf.n_embd % h)

    def change(name, types, value):
        return (types, n_heads) if name == "qwen2.attention.head_count" else (types, value)

    rewrite(base, out, change, add=[("qwen2.attention.key_length", [V.UINT32], 48)])
    stated = open_model_file(out)
    assert stated.n_embd % stated.n_heads and stated.head_dim == 48
    assert model_facts(stated).head_dim == 48 and mf.key_length == 0
