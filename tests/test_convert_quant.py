"""Quantized outputs equal what llama.cpp's own quantizer makes from the F32 file, tensor by tensor."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from edge_metastone.converters.convert import checkpoint_head_sidecar, convert
from edge_metastone.modelfile.read import open_model_file, read_gguf

FTYPES = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


def llama_quantize(src: Path, dst: Path, outtype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[outtype]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    reader = read_gguf(path)
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in reader.tensors}


def assert_same_as_llama_cpp(ours_path: Path, theirs_path: Path) -> None:
    ours, theirs = tensors(ours_path), tensors(theirs_path)
    assert set(ours) == set(theirs)
    type_diff = {n: (ours[n][0], theirs[n][0]) for n in ours if ours[n][0] != theirs[n][0]}
    assert not type_diff, f"tensor types differ (ours, llama.cpp): {type_diff}"
    byte_diff = [n for n in ours if ours[n][1] != theirs[n][1]]
    assert not byte_diff, f"tensor bytes differ from llama.cpp's quantizer: {byte_diff}"


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_k_m"])
def test_streaming_quantization_equals_llama_quantize(tiny_gguf, tmp_path, outtype):
    theirs = tmp_path / f"llama-{outtype}.gguf"
    llama_quantize(tiny_gguf("f32"), theirs, outtype)
    assert_same_as_llama_cpp(tiny_gguf(outtype), theirs)
    # llama.cpp's quantizer carries the head (metadata) through unchanged
    a, b = open_model_file(tiny_gguf("f32")).head, open_model_file(theirs).head
    assert b is not None and a.fc1_weight.tobytes() == b.fc1_weight.tobytes()


def test_untied_sharded_8_layer_mix_equals_llama_quantize(tiny_untied_hf, tmp_path):
    """Untied output.weight, 3 safetensors shards, 8 layers (so use_more_bits picks a real pattern)."""
    f32, ours, theirs = (tmp_path / n for n in ("f32.gguf", "ours.gguf", "theirs.gguf"))
    convert(tiny_untied_hf, f32, "f32")
    convert(tiny_untied_hf, ours, "q4_k_m")
    llama_quantize(f32, theirs, "q4_k_m")
    assert_same_as_llama_cpp(ours, theirs)
    types = {n: t for n, (t, _) in tensors(ours).items()}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    more_bits = sorted(n for n, t in types.items() if ".attn_v." in n and t == "Q6_K")
    # use_more_bits(i, 8): i < 1, i >= 7, or (i - 1) % 3 == 2
    assert more_bits == [f"blk.{i}.attn_v.weight" for i in (0, 3, 6, 7)]


def test_sharded_checkpoint_converts_like_single_file(tiny_hf, tmp_path):
    """Same weights saved as shards or as one file give the same tensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_hf, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(sharded / fname))
        weight_map.update(dict.fromkeys(part, fname))
    import json

    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    convert(sharded, tmp_path / "a.gguf", "q8_0")
    convert(tiny_hf, tmp_path / "b.gguf", "q8_0")
    a, b = tensors(tmp_path / "a.gguf"), tensors(tmp_path / "b.gguf")
    assert a == b


def test_no_head_checkpoint_converts_backbone(tiny_untied_hf, tmp_path, caplog):
    out = tmp_path / "nohead.gguf"
    with caplog.at_level("WARNING"):
        result = convert(tiny_untied_hf, out, "q8_0")
    assert not result.has_head
    assert "no SPRM head" in caplog.text
    mf = open_model_file(out)
    assert mf.head is None
    assert len(mf.step_token_ids) == 1  # delimiter ids are written even without a head


def test_head_sidecar_completes_a_headless_file(tiny_hf, tmp_path):
    """A head added beside an existing GGUF (NAME.sprm.gguf) is found and read bit for bit."""
    import shutil

    # a headless file of the same backbone: strip the head from a copy of the tiny checkpoint
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    (hf / "score_module.pt").unlink()
    model = tmp_path / "m.gguf"
    convert(hf, model, "q4_0")
    assert open_model_file(model).head is None
    checkpoint_head_sidecar(tiny_hf, tmp_path / "m.sprm.gguf")
    mf = open_model_file(model)
    assert mf.head is not None and mf.head_source == tmp_path / "m.sprm.gguf"
    import torch

    src = torch.load(tiny_hf / "score_module.pt", weights_only=True)
    assert mf.head.fc1_weight.tobytes() == src["0.weight"].numpy().tobytes()
    assert np.array_equal(mf.head.fc2_weight, src["3.weight"].numpy().reshape(-1))


def test_small_row_blocks_give_identical_files(tiny_gguf, tiny_hf, tmp_path, monkeypatch):
    """Streaming in many small row blocks writes exactly the bytes of whole-tensor conversion."""
    import edge_metastone.converters.hf_checkpoint as hf_checkpoint

    monkeypatch.setattr(hf_checkpoint, "CHUNK_BYTES", 4096)  # 4 rows of 256 floats per block
    for outtype in ("q4_k_m", "f16"):
        out = tmp_path / f"{outtype}.gguf"
        convert(tiny_hf, out, outtype)
        assert out.read_bytes() == tiny_gguf(outtype).read_bytes()
