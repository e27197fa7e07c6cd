"""`edge-metastone doctor [--json]`: what will run on this machine, ending with a real decode of the
embedded model in a child process (a crash there is a line of the report, not the end of it)."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Any

from edge_metastone.commands import add_weight_buffers, print_json
from edge_metastone.errors import EdgeMetastoneError

# The features worth a person's eye, from llama.cpp's CPU backend report.
_CPU_FEATURES = (
    "AVX2",
    "AVX512",
    "AVX512_VNNI",
    "AVX512_BF16",
    "AMX_INT8",
    "NEON",
    "SVE",
    "REPACK",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "doctor", help="what will run on this machine (build, weight buffers, GPU, a test decode)"
    )
    p.add_argument("--model", type=Path, default=None, help="decode this GGUF instead")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_weight_buffers(p)
    p.set_defaults(run=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _onnxruntime() -> dict[str, Any]:
    if importlib.util.find_spec("onnxruntime") is None:
        return {"installed": False, "version": None, "providers": []}
    try:
        import onnxruntime as ort

        return {
            "installed": True,
            "version": ort.__version__,
            "providers": list(ort.get_available_providers()),
        }
    except Exception as e:  # a broken install is a line of the report
        return {"installed": False, "version": None, "providers": [], "error": str(e)}


def report(model: Path | None, weight_buffers: str | None = None) -> dict[str, Any]:
    """Everything `doctor` shows, as a JSON-ready dict (the test decode included)."""
    import llama_cpp

    from edge_metastone.engine.capture import native_available
    from edge_metastone.engine.weights.build import build_report
    from edge_metastone.engine.weights.plan import canary_entries, plan_for, run_child_decode
    from edge_metastone.models import default_model_path
    from edge_metastone.paths import cache_dir
    from edge_metastone.types import WeightBuffers

    path = model if model is not None else default_model_path()
    build = build_report()
    plan = plan_for(path, weight_buffers).plan
    calib = cache_dir() / "calibration"
    decode = run_child_decode(path, WeightBuffers(weight_buffers) if weight_buffers else None)
    canaries = canary_entries()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": build.cpu,
        "packages": {
            "edge-metastone": _version("edge-metastone"),
            "llama-cpp-python": llama_cpp.__version__,
            "gguf": _version("gguf"),
            "numpy": _version("numpy"),
            "torch": _version("torch"),
        },
        "llama_cpp": {
            "build": build.build,
            "cpu_features": {k: build.features[k] for k in _CPU_FEATURES if k in build.features},
            "all_features": build.features,
            "extra_buffer_types": list(build.extra_bufts),
            "devices": list(build.devices),
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        },
        "weight_buffers": plan.to_json(),
        "capture_extension": native_available(),
        "onnxruntime": _onnxruntime(),
        "cache": {
            "path": str(cache_dir()),
            "calibrations": sorted(p.stem for p in calib.glob("*.json")) if calib.is_dir() else [],
            # verdicts for this build; older builds' verdicts are kept but no longer apply
            "canaries": [c for c in canaries if c.get("build") == build.build],
            "stale_canaries": sum(c.get("build") != build.build for c in canaries),
        },
        "embedded_model": str(default_model_path()),
        "test_decode": {"model": str(path), "ok": decode.ok, "detail": decode.detail},
        # how prompts are written for it (read once the child decoded it: the file loads)
        "prompt": _prompt(path) if decode.ok else None,
    }


def _prompt(path: Path) -> dict[str, Any]:
    """`inspect`'s prompt facts of the model file (its vocabulary alone is loaded)."""
    from edge_metastone.engine.engine import prompt_facts
    from edge_metastone.engine.llama import Model
    from edge_metastone.modelfile.read import open_model_file

    mf = open_model_file(path)
    with Model(path, vocab_only=True) as vocab:
        return prompt_facts(mf, vocab)


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when the test decode failed."""
    if args.model is not None and not args.model.is_file():
        raise EdgeMetastoneError(f"no such model file: {args.model}")
    d = report(args.model, args.weight_buffers)
    if args.json:
        print_json(d, indent=2)
        return 0 if d["test_decode"]["ok"] else 1
    pk, ll, wb, ort = d["packages"], d["llama_cpp"], d["weight_buffers"], d["onnxruntime"]
    feats = " ".join(f"{k}={v}" for k, v in ll["cpu_features"].items()) or "none reported"
    lines = [
        f"edge-metastone {pk['edge-metastone']} on Python {d['python']}, {d['platform']}",
        f"CPU:             {d['cpu']}",
        f"llama.cpp:       {ll['build']}",
        f"  CPU features:  {feats}",
        f"  extra buffers: {', '.join(ll['extra_buffer_types']) or 'none'}",
        f"  devices:       {', '.join(ll['devices'])}; GPU offload "
        + ("possible (--gpu-layers)" if ll["gpu_offload"] else "not built in (CPU only)"),
        f"weight buffers:  {wb['mode']}"
        + (f", {wb['repacked']} weights in CPU_REPACK" if wb["mode"] == "repack" else "")
        + f" ({wb['requested']}: {wb['reason']})",
        "capture:         "
        + ("C callback built" if d["capture_extension"] else "Python callback (no C build)"),
        "onnxruntime:     "
        + (
            f"{ort['version']}, providers {', '.join(ort['providers'])}"
            if ort["installed"]
            else "not installed (pip install 'edge-metastone[onnx]')"
        ),
        f"cache:           {d['cache']['path']} ({len(d['cache']['calibrations'])} calibrations, "
        f"{len(d['cache']['canaries'])} canary verdicts for this build"
        + (f", {d['cache']['stale_canaries']} for others" if d["cache"]["stale_canaries"] else "")
        + ")",
    ]
    for c in d["cache"]["canaries"]:
        verdict = "ran" if c.get("ok") else "FAILED"
        lines.append(
            f"  canary:        {c.get('mode')} on {','.join(c.get('types', []))}: {verdict}, "
            f"{c.get('detail')}"
        )
    td = d["test_decode"]
    lines += [
        f"embedded model:  {d['embedded_model']}",
        f"test decode:     {'ok' if td['ok'] else 'FAILED'}: {td['detail']} ({Path(td['model']).name}, "
        "child process)",
    ]
    if d["prompt"] is not None:
        pr = d["prompt"]
        lines.append(
            f"prompt format:   {pr['prompt_format_reason']}; BOS "
            + ("added to raw prompts" if pr["add_bos"] else "not added")
        )
    print("\n".join(lines))
    return 0 if td["ok"] else 1
