"""Every file the package writes through a temporary file leaves nothing behind when the write
fails or is interrupted (issue 24, "Temporary files leak on some error paths"): the failure is
injected at the rename or mid-write, a Ctrl-C (KeyboardInterrupt) as well as an OSError, and the
folder must then hold exactly what it held before."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from edge_metastone.batch import report
from edge_metastone.batch.jobfile import ResultLog
from edge_metastone.engine.weights import plan as wplan
from edge_metastone.engine.weights.plan import CanaryResult
from edge_metastone.gguf_io import atomic_output
from edge_metastone.paths import write_text_atomic

FAILURES = [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")]
FAILURE_IDS = ["ctrl-c", "disk-full"]


def raised(failure: BaseException | type[BaseException]) -> type[BaseException]:
    return failure if isinstance(failure, type) else type(failure)


def names(folder: Path) -> list[str]:
    """Everything in `folder`, hidden files included."""
    return sorted(p.name for p in folder.iterdir())


def failing(failure: BaseException | type[BaseException], calls: list | None = None):
    """A stand-in that raises `failure` (and records that it was called)."""

    def fail(*args, **kwargs):
        if calls is not None:
            calls.append(args)
        raise failure

    return fail


# --- the one helper for small files -----------------------------------------------------------


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_write_text_atomic_leaves_the_old_file_and_nothing_else(
    tmp_path, monkeypatch, failure, where
):
    path = tmp_path / "summary.json"
    path.write_text("old")
    monkeypatch.setattr(os, where, failing(failure))
    with pytest.raises(raised(failure)):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert names(tmp_path) == ["summary.json"] and path.read_text() == "old"


def test_write_text_atomic_writes_with_the_umask_and_replaces(tmp_path):
    path = tmp_path / "a.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two ✓")
    assert path.read_text(encoding="utf-8") == "two ✓" and names(tmp_path) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it


def test_a_missing_folder_is_an_oserror_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "no" / "a.json", "x")
    assert names(tmp_path) == []


# --- its users: the canary cache, the batch job's sidecars ------------------------------------


def test_an_interrupted_canary_store_leaves_no_temporary_file(tiny_gguf, monkeypatch, tmp_path):
    model = tiny_gguf("q8_0")
    monkeypatch.setenv("EDGE_METASTONE_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGE_METASTONE_WEIGHT_BUFFERS", raising=False)
    monkeypatch.setattr(wplan, "_verdicts", {})
    monkeypatch.setattr(wplan, "run_child_decode", lambda *a, **k: CanaryResult(True, "decoded"))
    calls: list = []
    monkeypatch.setattr(os, "replace", failing(KeyboardInterrupt, calls))
    with pytest.raises(KeyboardInterrupt):
        wplan.plan_for(model)
    monkeypatch.undo()
    assert calls, "the canary was never stored: the test injected nothing"
    assert names(tmp_path / "canary") == []


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_an_interrupted_options_sidecar_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(os, "replace", failing(failure))
    with pytest.raises(raised(failure)):
        ResultLog(out, {"options": {"seed": 1}})
    monkeypatch.undo()
    assert names(tmp_path) == ["out.jsonl"]  # the (empty) log; no options, no .partial
    with ResultLog(out, {"options": {"seed": 1}}) as log:  # a rerun starts cleanly
        assert log.records == []
    assert names(tmp_path) == ["out.jsonl", "out.options.json"]


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_an_interrupted_summary_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "out.summary.json"
    monkeypatch.setattr(os, "replace", failing(failure))
    with pytest.raises(raised(failure)):
        report._write_json(path, {"records": 3})
    monkeypatch.undo()
    assert names(tmp_path) == []


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_an_interrupted_calibration_store_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    from edge_metastone import calibration, scheduler

    monkeypatch.setattr(calibration, "cache_dir", lambda: tmp_path)
    cal = scheduler.Calibration({1: 0.01, 8: 0.02}, 1000.0, 1 << 20, 2, key="m")
    monkeypatch.setattr(os, "replace", failing(failure))
    if raised(failure) is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            calibration.store(cal)
    else:
        calibration.store(cal)  # a cache that cannot be written is a warning, not an error
    monkeypatch.setattr(os, "replace", os.rename)
    assert names(tmp_path / "calibration") == []
    calibration.store(cal)
    assert names(tmp_path / "calibration") == ["m.json"]


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
@pytest.mark.parametrize("where", ["write", "rename"])
def test_an_interrupted_sample_cache_leaves_no_temporary_file(
    tmp_path, monkeypatch, failure, where
):
    import numpy as np

    from edge_metastone.training import collect

    data = collect.ProblemData(
        key="k",
        features=np.zeros((2, 3), np.float32),
        steps=np.array([1, 1]),
        correct=np.array([True, False]),
        truncated=np.array([False, False]),
        mean_logprob=np.zeros(2),
        tokens=np.array([3, 4]),
        answers=["1", "2"],
        token_logprobs=np.zeros(7, np.float32),
        n_logprobs=np.array([3, 4]),
    )
    if where == "write":
        monkeypatch.setattr(np, "savez", failing(failure))
    else:
        monkeypatch.setattr(os, "replace", failing(failure))
    with pytest.raises(raised(failure)):
        data.save(tmp_path / "k.npz")
    monkeypatch.undo()
    assert names(tmp_path) == []
    data.save(tmp_path / "k.npz")
    assert names(tmp_path) == ["k.npz"]
    assert collect.ProblemData.load(tmp_path / "k.npz").answers == ["1", "2"]


# --- model files: GGUF and ONNX ---------------------------------------------------------------


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_a_gguf_write_interrupted_in_the_block_or_at_the_rename_leaves_the_old_file(
    tmp_path, monkeypatch, failure
):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"previous good file")
    with pytest.raises(raised(failure)), atomic_output(path) as tmp:
        tmp.write_bytes(b"half a model")
        raise failure
    monkeypatch.setattr(os, "replace", failing(failure))
    with pytest.raises(raised(failure)), atomic_output(path) as tmp:
        tmp.write_bytes(b"a whole model")
    monkeypatch.undo()
    assert names(tmp_path) == ["model.gguf"] and path.read_bytes() == b"previous good file"


def test_a_conversion_interrupted_by_ctrl_c_leaves_no_partial_file(tiny_hf, tmp_path, monkeypatch):
    import edge_metastone.converters.convert as convert_module

    real_encode, calls = convert_module._encode, []

    def encode(t, data):
        calls.append(t.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_encode(t, data)

    monkeypatch.setattr(convert_module, "_encode", encode)
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(tiny_hf, tmp_path / "out.gguf", "q8_0")
    assert len(calls) == 5 and names(tmp_path) == []


@pytest.fixture(scope="module")
def onnx_model(tiny_hf, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    from edge_metastone.converters.onnx_export import export_onnx

    return export_onnx(tiny_hf, tmp_path_factory.mktemp("onnx") / "tiny-f32", "f32").path


def test_an_onnx_export_interrupted_while_saving_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    from edge_metastone.converters.onnx_export import export_onnx

    monkeypatch.setattr(onnx, "save_model", failing(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_hf, tmp_path / "out", "f32")
    assert names(tmp_path) == []


def test_an_onnx_replacement_interrupted_while_removing_the_old_model_finishes_it(
    tiny_hf, onnx_model, tmp_path, monkeypatch
):
    """Ctrl-C while the replaced model is being deleted: the new model is in place and the old
    one (renamed aside first) is still removed whole."""
    from edge_metastone.converters.onnx_export import export_onnx

    out = tmp_path / "ours"
    shutil.copytree(onnx_model, out)
    (out / "model.onnx.data").write_bytes(b"old")
    real_rmtree, interrupted = shutil.rmtree, []

    def rmtree(path, *args, **kwargs):
        if str(path).endswith(".old") and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt  # before it removed anything
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_hf, out, "f32")
    monkeypatch.undo()
    assert interrupted and names(tmp_path) == ["ours"]
    assert (out / "model.onnx.data").read_bytes() == (onnx_model / "model.onnx.data").read_bytes()
    assert json.loads((out / "metastone.json").read_text())["format"] == "edge-metastone-onnx"
