"""Conformance with stock llama.cpp, token for token: every architecture family the fixture
scripts build (the tiny Qwen2 fixture and its `llama` and `qwen3` rewrites) and the real SmolLM2
file, raw and chat, greedy k=1 for 64 tokens, our engine against stock `llama_cpp.Llama`
(`create_completion` / `create_chat_completion`) on the same file, threads and settings (F16 KV
cache, flash attention off on both: llama-cpp-python's defaults, and ours for these files).

Compared: the prompt ids (stock: the ids its context evaluated first) and the generated ids (stock
evaluates every generated token but the last, so its context holds all but that one; its text
gives the rest). The one documented difference: a file without a chat template whose vocabulary
has no ChatML tokens (the `llama` base model here) gets no chat prompt from us (one clear error:
use raw prompts), where stock llama-cpp-python writes Llama-2's `[INST]` markup.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest
from stock_llama import stock_defaults

from edge_metastone.errors import InvalidRequestError
from edge_metastone.runtime import open_backend
from edge_metastone.types import GenerationSettings, SamplingSettings

HERE = Path(__file__).resolve().parent
RAW = "Q: 3 + 4 + 2\n3 + 4 = 7\n7 + 2 = 9\nA: 9\n\nQ: 8 + 7 + 4\n"
CHAT = [{"role": "user", "content": "What is 8 + 7 + 4? Think step by step."}]
N_NEW = 64


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(HERE / "fixtures"))
    from make_arch_variants import ARCHS, write_variant
    from real_model import smollm2_gguf

    base = tiny_gguf("f32")
    out = tmp_path_factory.mktemp("arch")
    found = {"qwen2": base, "smollm2 (llama)": smollm2_gguf(install=False)}
    for arch in ARCHS:
        found[arch] = write_variant(base, out / f"tiny-{arch}.gguf", arch)
    return found


def ours(path: Path, mode: str) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, generated text) from our engine."""
    with open_backend(path, n_threads=2) as b:
        ids = b.tokenize_prompt(RAW) if mode == "raw" else b.encode_chat(CHAT)[1]
        (c,) = b.generate_all(
            ids, 1, SamplingSettings(temperature=0.0), GenerationSettings(max_new_tokens=N_NEW)
        )
    return list(ids), list(c.token_ids), c.text


def stock(path: Path, mode: str) -> tuple[list[int], list[int], str]:
    """(prompt ids, all but the last generated id, generated text) from stock llama-cpp-python,
    loaded with the engine's weight buffers (llama.cpp's default puts weights in AMX buffers on an
    AMX CPU, whose matmul segfaults in the first decode: llama.cpp issue 20824)."""
    with stock_defaults(path):
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False
        )
    try:
        if mode == "raw":
            out = llm.create_completion(RAW, max_tokens=N_NEW, temperature=0.0)
            text = out["choices"][0]["text"]
            n_prompt = out["usage"]["prompt_tokens"]
        else:
            out = llm.create_chat_completion(CHAT, max_tokens=N_NEW, temperature=0.0)
            text = out["choices"][0]["message"]["content"]
            n_prompt = out["usage"]["prompt_tokens"]
        seen = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    finally:
        llm.close()
    return seen[:n_prompt], seen[n_prompt:], text


CASES = [
    (name, mode)
    for name in ("qwen2", "llama", "qwen3", "smollm2 (llama)")
    for mode in ("raw", "chat")
]


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_same_tokens_as_stock_llama_cpp(files, name: str, mode: str) -> None:
    path = files[name]
    if name == "llama" and mode == "chat":
        with pytest.raises(InvalidRequestError, match=r"no chat template.*raw"):
            ours(path, mode)
        return
    p_ours, g_ours, text = ours(path, mode)
    p_stock, g_stock, stock_text = stock(path, mode)
    assert p_ours == p_stock, f"{name} {mode}: prompt ids differ"
    assert len(g_stock) >= len(g_ours) - 1 and g_ours[: len(g_stock)] == g_stock, (
        f"{name} {mode}: generated ids differ"
    )
    # the same text, but for bytes that are not UTF-8 (random weights): stock drops them, we
    # write U+FFFD
    assert text.replace("\ufffd", "").strip() == stock_text.strip()


def test_raw_prompt_gets_the_files_bos_once(files) -> None:
    """The base model's tokenizer asks for a BOS: a raw prompt gets it, once, also when the text
    already starts with it (llama.cpp alone would double it); a file that asks for none gets none."""
    with open_backend(files["llama"], n_threads=2) as b:
        bos = b.bos_id
        ids = b.tokenize_prompt(RAW)
        assert ids[0] == bos and ids[1] != bos
        assert b.tokenize_prompt("<|endoftext|>" + RAW) == ids
        assert b.prompt_format.name == "none"
    with open_backend(files["qwen2"], n_threads=2) as b:
        assert b.tokenize_prompt(RAW) == b.tokenize(RAW)  # Qwen2 adds no BOS
        assert b.prompt_format.name == "file"


def test_a_base_model_without_a_format_is_said_so_everywhere(files) -> None:
    """No borrowed markup: `inspect` says the format and the BOS, `reason` refuses a chat prompt
    in one line (exit 1) and answers a raw one, the server's model card names the format and a
    chat request is a 400 saying to use a raw prompt."""
    import json
    import subprocess
    import sys

    from starlette.testclient import TestClient

    from edge_metastone.reasoner import Reasoner
    from edge_metastone.server.app import create_app

    path = str(files["llama"])
    cli = [sys.executable, "-m", "edge_metastone"]
    out = subprocess.run([*cli, "inspect", path, "--json"], capture_output=True, text=True)
    prompt = json.loads(out.stdout)["prompt"]
    assert prompt["prompt_format"] == "none" and prompt["add_bos"] and prompt["think_tags"] is None
    chat = subprocess.run(
        [*cli, "reason", "--model", path, "--max-new-tokens", "4", "hi"],
        capture_output=True,
        text=True,
    )
    assert chat.returncode == 1 and "--raw" in chat.stderr
    assert chat.stderr.count("\n") == 1 and "Traceback" not in chat.stderr
    raw = subprocess.run(
        [*cli, "reason", "--model", path, "--raw", "--max-new-tokens", "4", "--json", RAW],
        capture_output=True,
        text=True,
    )
    assert raw.returncode == 0, raw.stderr
    with (
        Reasoner(path, n_threads=2) as r,
        TestClient(create_app(r), base_url="http://127.0.0.1") as http,
    ):
        card = http.get("/v1/models").json()["data"][0]["metastone"]
        assert card["prompt_format"] == "none"
        resp = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert resp.status_code == 400 and "raw" in resp.json()["error"]["message"]


def test_a_fallback_chatml_is_a_warning(files, tmp_path) -> None:
    """A file without a template whose vocabulary has ChatML gets ChatML, and says so."""
    import json
    import subprocess
    import sys

    sys.path.insert(0, str(HERE / "fixtures"))
    from make_arch_variants import write_variant

    path = write_variant(
        files["qwen2"], tmp_path / "no-template.gguf", "qwen2", drop=("tokenizer.chat_template",)
    )
    cli = [sys.executable, "-m", "edge_metastone", "reason", "--model", str(path)]
    out = subprocess.run(
        [*cli, "--max-new-tokens", "4", "--json", "hi"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert any("chatml+think" in w for w in res["warnings"]), res["warnings"]
    assert res["prompt_text"].endswith("<|im_start|>assistant\n<think>\n")
    assert "warning: chat prompt written as chatml+think" in out.stderr
