"""Where llama.cpp keeps the weights: the mode decision (faked build reports), the repack overrides
against llama.cpp's own buffers and plain-mode logits, the canary's fallback, decodes through the
package's default path in child processes (a crash fails one test, not pytest), and `doctor`."""

from __future__ import annotations

import json
import logging
import os
import re
import signal

import numpy as np
import pytest
from stock_llama import stock_defaults

from conftest import cli_json, run_cli
from edge_metastone.engine.weights import plan as wplan
from edge_metastone.engine.weights.build import BuildReport, build_report
from edge_metastone.engine.weights.decision import KNOWN_BAD, decide
from edge_metastone.engine.weights.placement import repack_patterns
from edge_metastone.engine.weights.plan import CanaryResult
from edge_metastone.errors import InvalidRequestError
from edge_metastone.models import default_model_path
from edge_metastone.types import WEIGHT_BUFFERS_ENV, WeightBuffers, requested_mode

AMX_XEON = BuildReport(
    cpu="Intel(R) Xeon(R) Processor",
    extra_bufts=("AMX", "CPU_REPACK"),
    features={"AVX2": "1", "AVX512": "1", "AMX_INT8": "1", "REPACK": "1"},
    build="faked",
)
AVX2_LAPTOP = BuildReport(cpu="laptop", extra_bufts=("CPU_REPACK",), features={"AVX2": "1"})
AMX_NO_REPACK = BuildReport(cpu="x", extra_bufts=("AMX",))
NO_EXTRAS = BuildReport(cpu="x", extra_bufts=())


def _signal_message(proc) -> str:
    if proc.returncode < 0:
        return f"killed by {signal.Signals(-proc.returncode).name}: {proc.stderr[-2000:]}"
    return proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("requested", "report", "gpu", "expected", "says"),
    [
        ("auto", AMX_XEON, 0, "repack", "issue 20824"),
        ("auto", AVX2_LAPTOP, 0, "extra", "llama.cpp's default"),
        ("auto", NO_EXTRAS, 0, "extra", "none"),
        ("auto", AMX_NO_REPACK, 0, "plain", "no CPU_REPACK"),
        ("auto", AMX_XEON, -1, "plain", "GPU offload"),
        ("extra", AMX_XEON, 0, "extra", "including AMX"),
        ("plain", AVX2_LAPTOP, 0, "plain", "as asked"),
        ("repack", AVX2_LAPTOP, 0, "repack", "as asked"),
        ("repack", NO_EXTRAS, 0, "plain", "no CPU_REPACK"),
        ("repack", AVX2_LAPTOP, 10, "plain", "GPU offload"),
    ],
)
def test_mode_decision_from_faked_build_reports(requested, report, gpu, expected, says):
    plan = decide(WeightBuffers(requested), report, gpu_layers=gpu)
    assert plan.mode.value == expected, plan
    assert says in plan.reason, plan.reason
    assert plan.requested.value == requested


def test_mode_from_argument_environment_and_default(monkeypatch):
    monkeypatch.delenv(WEIGHT_BUFFERS_ENV, raising=False)
    assert requested_mode() is WeightBuffers.AUTO
    monkeypatch.setenv(WEIGHT_BUFFERS_ENV, "plain")
    assert requested_mode() is WeightBuffers.PLAIN
    assert requested_mode("extra") is WeightBuffers.EXTRA  # the argument wins
    monkeypatch.setenv(WEIGHT_BUFFERS_ENV, "amx-please")
    with pytest.raises(InvalidRequestError, match=WEIGHT_BUFFERS_ENV):
        requested_mode()
    from edge_metastone.cli import build_parser

    for mode in WeightBuffers:  # every command that loads a GGUF offers every mode
        for command in ("reason", "doctor", "inspect"):
            argv = [command, "--weight-buffers", mode.value] + (
                ["M.gguf"] if command == "inspect" else []
            )
            args = build_parser().parse_args(argv)
            assert args.weight_buffers == mode.value


def test_this_machine_never_gets_a_known_bad_buffer_type_by_default(tiny_gguf, monkeypatch):
    monkeypatch.delenv(WEIGHT_BUFFERS_ENV, raising=False)
    plan = wplan.plan_for(tiny_gguf("q4_0")).plan
    report = build_report()
    if any(b in KNOWN_BAD for b in report.extra_bufts):
        assert plan.mode is not WeightBuffers.EXTRA, plan
    else:  # llama.cpp's own default wherever it is safe
        assert plan.mode is WeightBuffers.EXTRA, plan


def _buffer_sizes(records: list[logging.LogRecord]) -> dict[str, float]:
    """llama.cpp's `load_tensors: NAME model buffer size = X MiB` lines."""
    out = {}
    for r in records:
        msg = r.getMessage()
        if "model buffer size" in msg:
            name, _, rest = msg.split("load_tensors:")[-1].partition("model buffer size =")
            out[name.strip()] = float(rest.split()[0])
    return out


def _logits(path, mode: str) -> tuple[list[int], np.ndarray]:
    from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model

    with Model(path, weight_buffers=mode) as model:
        ids = model.tokenize("What is (17+25)*3-40? Let me think. 17+25=42.")
        with Context(model, ContextSettings(n_ctx=128, n_batch=64)) as ctx, Batch(64) as batch:
            for _ in ctx.prefill(batch, ids, all_logits=True):
                pass
            return ids, np.stack([ctx.logits(i) for i in range(len(ids))])


def test_repack_overrides_fill_cpu_repack_and_keep_the_logits(tiny_hf, tiny_gguf, caplog):
    """Every weight the overrides name lands in llama.cpp's CPU_REPACK buffer (its own log says
    how big), and against HF float32 the repacked Q4_0 model is as close as the plain one: mean
    and max |logit error| within 10% of plain's (both quantize activations to Q8_0; only the
    summation order differs), and repack - plain under a tenth of plain's own error."""
    from reference_scorer import load_reference, reference_forward

    path = tiny_gguf("q4_0")
    report = build_report()
    if "CPU_REPACK" not in report.extra_bufts:
        pytest.skip("this llama.cpp build has no CPU_REPACK")
    patterns, n = repack_patterns(path)
    from gguf import GGUFReader

    named, expected_mib = 0, 0.0
    for t in GGUFReader(str(path)).tensors:
        if any(re.search(p, t.name) for p in patterns):
            expected_mib += t.n_bytes / 2**20
            named += 1
    assert named == n > 0, (patterns, n)
    caplog.set_level(logging.DEBUG, logger="llama_cpp.native")
    ids, repacked = _logits(path, "repack")
    sizes = _buffer_sizes(caplog.records)
    assert "AMX" not in sizes, sizes
    assert sizes.get("CPU_REPACK") == pytest.approx(expected_mib, abs=0.01), sizes
    caplog.clear()
    _, plain = _logits(path, "plain")
    assert "CPU_REPACK" not in _buffer_sizes(caplog.records)
    model, _, _ = load_reference(tiny_hf)
    ref, _ = reference_forward(model, ids)
    ref = ref[:, : plain.shape[1]]
    err_plain, err_repack = np.abs(plain - ref), np.abs(repacked - ref)
    between = float(np.abs(repacked - plain).max())
    msg = (
        f"mean/max |logit - HF f32|: plain {err_plain.mean():.4f}/{err_plain.max():.4f}, "
        f"repack {err_repack.mean():.4f}/{err_repack.max():.4f}; max |repack - plain| {between:.4f}"
    )
    assert err_repack.mean() <= 1.1 * err_plain.mean(), msg
    assert err_repack.max() <= 1.1 * err_plain.max(), msg
    assert between < 0.1 * err_plain.max(), msg


def test_canary_crash_steps_down_and_is_remembered(tiny_gguf, monkeypatch, tmp_path):
    """A mode whose test decode is killed by a signal is not used, and the verdict is cached."""
    monkeypatch.setenv("EDGE_METASTONE_CACHE", str(tmp_path))
    monkeypatch.delenv(WEIGHT_BUFFERS_ENV, raising=False)
    monkeypatch.setattr(wplan, "_verdicts", {})
    calls = []

    def crashing(path, mode, **kw):
        calls.append(mode)
        return CanaryResult(False, "killed by signal 11 (SIGSEGV)")

    monkeypatch.setattr(wplan, "run_child_decode", crashing)
    plan = wplan.plan_for(tiny_gguf("q8_0")).plan
    assert plan.mode is WeightBuffers.PLAIN
    assert "SIGSEGV" in plan.reason
    assert calls and WeightBuffers.PLAIN not in calls  # plain is the floor, never tested
    stored = wplan.canary_entries()
    assert stored and all(not e["ok"] for e in stored)
    monkeypatch.setattr(wplan, "_verdicts", {})  # a new process: the cache answers
    n = len(calls)
    assert wplan.plan_for(tiny_gguf("q8_0")).plan.mode is WeightBuffers.PLAIN
    assert len(calls) == n


def test_canary_time_out_is_not_cached(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_METASTONE_CACHE", str(tmp_path))
    monkeypatch.delenv(WEIGHT_BUFFERS_ENV, raising=False)
    monkeypatch.setattr(wplan, "_verdicts", {})
    monkeypatch.setattr(
        wplan, "run_child_decode", lambda *a, **k: CanaryResult(False, "no answer in 180 s")
    )
    wplan.plan_for(tiny_gguf("q8_0"))
    assert wplan.canary_entries() == []


def test_real_canary_decodes_in_a_child(tiny_gguf):
    result = wplan.run_child_decode(tiny_gguf("q4_0"), None)
    assert result.ok, result.detail
    assert "decoded 40 tokens" in result.detail


def test_default_path_decodes_in_a_child_process(monkeypatch):
    """README command 1's path (embedded model, no flag, no variable) in a child process: a
    crash in llama.cpp fails this test with the signal's name instead of killing pytest."""
    env = {k: v for k, v in os.environ.items() if k != WEIGHT_BUFFERS_ENV}
    monkeypatch.setattr(os, "environ", env)
    proc = run_cli("reason", "What is (17+25)*3-40?", "--effort", "low", "--json")
    assert proc.returncode == 0, _signal_message(proc)
    out = json.loads(proc.stdout)
    assert out["answer"] == "86"
    t = out["timings"]
    assert t["weight_buffers"] in {"extra", "repack", "plain"}
    assert t["weight_buffers_reason"].startswith("auto: ")


def test_flag_and_environment_reach_the_timings(tmp_path):
    out = cli_json(
        "reason", "What is 2+3?", "--effort", "low", "--weight-buffers", "plain", "--json"
    )
    assert out["timings"]["weight_buffers"] == "plain"
    assert out["timings"]["weight_buffers_reason"] == "plain: as asked: no extra buffer types"


def test_the_flag_reaches_every_command_that_loads_a_model(monkeypatch):
    """--weight-buffers is handed to each load (it no longer travels through the process's
    environment): inspect and doctor report the asked mode, with the variable set to another
    mode that the flag overrides."""
    monkeypatch.setenv(WEIGHT_BUFFERS_ENV, "extra")
    model = str(default_model_path())
    seen = cli_json("inspect", model, "--weight-buffers", "plain", "--json")
    assert seen["weight_buffers"]["mode"] == "plain"
    assert cli_json("doctor", "--weight-buffers", "plain", "--json")["weight_buffers"]["mode"] == (
        "plain"
    )


def test_bad_environment_value_is_one_line(monkeypatch):
    monkeypatch.setenv(WEIGHT_BUFFERS_ENV, "turbo")
    proc = run_cli("reason", "What is 2+3?", "--effort", "low")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert WEIGHT_BUFFERS_ENV in proc.stderr and "turbo" in proc.stderr
    assert proc.stdout == ""


def test_stock_llama_cpp_python_loads_in_the_same_mode(tiny_gguf):
    import llama_cpp

    path = tiny_gguf("q4_0")
    with stock_defaults(path, "repack") as placement:
        llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is False
        assert placement.plan.mode is WeightBuffers.REPACK or "CPU_REPACK" not in (
            build_report().extra_bufts
        )
        llm.eval(llm.tokenize(b"hello there"))  # decodes
    finally:
        llm.close()
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True  # restored


def test_doctor_on_this_machine():
    d = cli_json("doctor", "--json")
    assert d["test_decode"]["ok"], d["test_decode"]
    assert d["cpu"]
    assert d["llama_cpp"]["devices"][0] == "CPU" or "CPU" in d["llama_cpp"]["devices"]
    assert d["weight_buffers"]["mode"] in {"extra", "repack", "plain"}
    if any(b in KNOWN_BAD for b in d["llama_cpp"]["extra_buffer_types"]):
        assert d["weight_buffers"]["mode"] != "extra"
    assert d["embedded_model"] == str(default_model_path())
    assert isinstance(d["capture_extension"], bool)
    assert "providers" in d["onnxruntime"]
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    for label in ("CPU:", "llama.cpp:", "weight buffers:", "capture:", "onnxruntime:", "cache:"):
        assert label in proc.stdout, proc.stdout
    assert "test decode:     ok" in proc.stdout
