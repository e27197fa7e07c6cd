"""`convert --format onnx` never deletes what it did not write, and replaces its own output by a
rename: an existing directory is refused unless it is an ONNX model directory of ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnx")

from edge_metastone.converters.onnx_export import export_onnx
from edge_metastone.errors import BadCheckpointError


@pytest.fixture(scope="module")
def exported(tiny_hf, tmp_path_factory) -> Path:
    return export_onnx(tiny_hf, tmp_path_factory.mktemp("onnx") / "tiny-f32", "f32").path


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_directory_with_other_files_is_refused_untouched(tiny_hf, exported, tmp_path):
    # our metastone.json beside a file of the user's: not ours to delete
    d = _copy(exported, tmp_path / "mixed")
    (d / "notes.txt").write_text("mine")
    before = _snapshot(d)
    with pytest.raises(BadCheckpointError, match="refusing to overwrite"):
        export_onnx(tiny_hf, d, "f32")
    assert _snapshot(d) == before


@pytest.mark.parametrize("meta", ["{}", '{"format": "someone-else"}', "not json"])
def test_a_foreign_metastone_json_is_refused(tiny_hf, tmp_path, meta):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "metastone.json").write_text(meta)
    (d / "model.onnx").write_bytes(b"their model")
    with pytest.raises(BadCheckpointError, match="refusing to overwrite"):
        export_onnx(tiny_hf, d, "f32")
    assert (d / "model.onnx").read_bytes() == b"their model"


def test_our_own_directory_is_replaced_and_nothing_is_left_beside_it(tiny_hf, exported, tmp_path):
    d = _copy(exported, tmp_path / "ours")
    (d / "model.onnx.data").write_bytes(b"stale")  # an older export of ours
    export_onnx(tiny_hf, d, "f32")
    assert _snapshot(d) == _snapshot(exported)
    assert json.loads((d / "metastone.json").read_text())["format"] == "edge-metastone-onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_a_failed_swap_keeps_the_old_model(tiny_hf, exported, tmp_path, monkeypatch):
    # the new directory cannot be renamed into place: the old model must still be there (the
    # old code removed it first, then renamed)
    d = _copy(exported, tmp_path / "ours")
    (d / "model.onnx.data").write_bytes(b"old")
    before = _snapshot(d)
    real_rename = Path.rename

    def rename(self: Path, target):
        if self.name.endswith(".partial"):
            raise OSError("simulated: rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        export_onnx(tiny_hf, d, "f32")
    monkeypatch.undo()
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]
