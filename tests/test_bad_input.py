"""Bad input: one-line error, non-zero exit, no traceback, nothing written half-way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import edge_metastone.converters.convert as convert_module
from conftest import run_cli
from edge_metastone.converters.convert import convert
from edge_metastone.errors import BadCheckpointError, BadModelFileError
from edge_metastone.modelfile.read import open_model_file


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def hf_copy(tiny_hf: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(tiny_hf, dst)
    return dst


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.txt"
    p.write_text("<think>\nOne step.\n\nTwo.\n\n</think>", encoding="utf-8")
    return p


def test_truncated_gguf(tiny_gguf, tmp_path, text_file):
    data = tiny_gguf("q8_0").read_bytes()
    for cut in (10, 2000, len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        assert_one_line_error(run_cli("inspect", str(bad)), "trunc")
        assert_one_line_error(
            run_cli("score", "--model", str(bad), "--text-file", str(text_file)), "trunc"
        )


def test_not_a_gguf(tmp_path, text_file):
    bad = tmp_path / "x.gguf"
    bad.write_text("this is not a model file")
    assert_one_line_error(run_cli("inspect", str(bad)), "not a GGUF")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "missing.gguf")), "no such file")


def test_gguf_of_another_architecture(tmp_path, text_file):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(
        run_cli("inspect", str(path)),
        "architecture 'mamba' is not supported (supported: qwen2, qwen3, llama, gemma, gemma2, "
        "gemma3, phi3)",
    )
    assert_one_line_error(
        run_cli("score", "--model", str(path), "--text-file", str(text_file)), "mamba"
    )


def test_non_qwen2_checkpoint(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.gguf"
    assert_one_line_error(
        run_cli("convert", str(hf_copy), "-o", str(out)), "LlamaForCausalLM is not supported"
    )
    assert not out.exists()


def test_head_with_wrong_shapes(hf_copy, tmp_path):
    state = torch.load(hf_copy / "score_module.pt", weights_only=True)
    state["0.weight"] = state["0.weight"][:, :128].contiguous()
    torch.save(state, hf_copy / "score_module.pt")
    out = tmp_path / "out.gguf"
    assert_one_line_error(run_cli("convert", str(hf_copy), "-o", str(out)), "0.weight", "shape")
    assert not out.exists()


def test_head_with_wrong_keys(hf_copy, tmp_path):
    state = torch.load(hf_copy / "score_module.pt", weights_only=True)
    state["2.weight"] = state.pop("3.weight")
    torch.save(state, hf_copy / "score_module.pt")
    assert_one_line_error(run_cli("convert", str(hf_copy), "-o", str(tmp_path / "o.gguf")), "keys")


def test_score_module_that_is_not_a_plain_state_dict(hf_copy, tmp_path):
    head = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(512, 1)
    )
    torch.save(head, hf_copy / "score_module.pt")  # a pickled module, not a state dict
    out = tmp_path / "out.gguf"
    proc = run_cli("convert", str(hf_copy), "-o", str(out))
    assert_one_line_error(proc, "not a plain state dict")
    assert not out.exists()


def test_tensor_shape_disagreeing_with_config(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(
        run_cli("convert", str(hf_copy), "-o", str(tmp_path / "o.gguf")), "config.json implies"
    )


def test_truncated_safetensors_shard(hf_copy, tmp_path):
    st = hf_copy / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    out = tmp_path / "out.gguf"
    assert_one_line_error(run_cli("convert", str(hf_copy), "-o", str(out)), "safetensors")
    assert not out.exists()


def test_failure_midway_leaves_no_partial_file_and_keeps_the_old_one(
    tiny_hf, tmp_path, monkeypatch
):
    """A conversion that dies after some tensors were written (disk full, say) loses nothing."""
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous good file")
    real_encode, calls = convert_module._encode, []

    def failing_encode(t, data):
        calls.append(t.name)
        if len(calls) == 10:
            raise BadCheckpointError("simulated write failure")
        return real_encode(t, data)

    monkeypatch.setattr(convert_module, "_encode", failing_encode)
    with pytest.raises(BadCheckpointError, match="simulated"):
        convert(tiny_hf, out, "q4_0")
    assert len(calls) == 10
    assert out.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_score_without_head(tiny_untied_hf, tmp_path, text_file):
    out = tmp_path / "nohead.gguf"
    proc = run_cli("convert", str(tiny_untied_hf), "-o", str(out), "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "NO SPRM head" in proc.stderr
    assert_one_line_error(
        run_cli("score", "--model", str(out), "--text-file", str(text_file)), "no SPRM head"
    )
    assert "none" in run_cli("inspect", str(out)).stdout


def test_text_longer_than_context(tiny_gguf, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("<think>" + "Add 1 and 2.\n\n" * 1200, encoding="utf-8")
    assert_one_line_error(
        run_cli("score", "--model", str(tiny_gguf("f32")), "--text-file", str(long)), "context"
    )


def test_missing_text_file(tiny_gguf, tmp_path):
    assert_one_line_error(
        run_cli("score", "--model", str(tiny_gguf("f32")), "--text-file", str(tmp_path / "no.txt")),
        "cannot read",
    )


def test_sidecar_with_wrong_hidden_size(tiny_gguf, tmp_path):
    from edge_metastone.gguf_io import ArrayGGUFWriter

    side = tmp_path / "side.gguf"
    w = ArrayGGUFWriter(side, "qwen2")
    w.add_uint32("metastone.sprm.version", 1)
    w.add_int32("metastone.sprm.feature_layer", 2)
    w.add_uint32("metastone.sprm.hidden_size", 8)
    w.add_uint32("metastone.sprm.inner_size", 16)
    w.add_string("metastone.sprm.dtype", "f32")
    for key, n in (("fc1.weight", 128), ("fc1.bias", 16), ("fc2.weight", 16), ("fc2.bias", 1)):
        w.add_numpy_array(f"metastone.sprm.{key}", np.zeros(n, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(BadModelFileError, match="hidden size 8"):
        open_model_file(tiny_gguf("f32"), side)
