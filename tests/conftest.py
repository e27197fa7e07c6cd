"""Session fixtures: tiny MetaStone checkpoints built once, and their GGUF conversions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures.make_qwen_vocab import build_qwen_vocab_metastone
from fixtures.make_tiny_metastone import build_tiny_metastone

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibrations made by tests go to a temporary folder, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["EDGE_METASTONE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MetaStone-format checkpoint (tied embeddings, with head)."""
    return build_tiny_metastone(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


@pytest.fixture(scope="session")
def tiny_untied_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied embeddings, sharded safetensors, no head, 8 layers."""
    return build_tiny_metastone(
        tmp_path_factory.mktemp("untied") / "hf",
        seed=1,
        shards=3,
        head=False,
        tied=False,
        n_layers=8,
    )


class GgufCache:
    """Converts a checkpoint once per output type and session."""

    def __init__(self, hf_dir: Path, out_dir: Path) -> None:
        self.hf_dir, self.out_dir = hf_dir, out_dir
        self._paths: dict[str, Path] = {}

    def __call__(self, outtype: str) -> Path:
        if outtype not in self._paths:
            from edge_metastone.converters.convert import convert

            path = self.out_dir / f"tiny-{outtype}.gguf"
            convert(self.hf_dir, path, outtype)
            self._paths[outtype] = path
        return self._paths[outtype]


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> GgufCache:
    """`tiny_gguf("q8_0")` -> path of the converted fixture."""
    return GgufCache(tiny_hf, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def qwen_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen's real vocabulary (151,936 ids, NFC, Qwen2.5's chat template), tiny random weights."""
    return build_qwen_vocab_metastone(tmp_path_factory.mktemp("qwen") / "hf", seed=0)


@pytest.fixture(scope="session")
def qwen_gguf(qwen_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real-vocabulary checkpoint converted to F32 once per session."""
    from edge_metastone.converters.convert import convert

    path = tmp_path_factory.mktemp("qwen-gguf") / "qwen-vocab-f32.gguf"
    convert(qwen_hf, path, "f32")
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `edge-metastone ARGS` as a user would, in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "edge_metastone", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def cli_json(*args: str) -> dict:
    """Run a CLI command that prints JSON and parse it; fail with its stderr otherwise."""
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def parked_at_gate(t: threading.Thread, inside: str) -> bool:
    """True when thread `t` waits at the request gate (its innermost frame is in gate.py, where a
    request queues for the model) from inside a function named `inside` (`reason`, `calibration`)."""
    frame = sys._current_frames().get(t.ident)
    while frame is not None and frame.f_code.co_filename.endswith("threading.py"):
        frame = frame.f_back  # the gate's condition variable
    if frame is None or not frame.f_code.co_filename.endswith("gate.py"):
        return False
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return inside in names


def wait_until(condition, what: str, timeout: float = 120.0) -> float:
    """Poll `condition()` until it holds; returns time.monotonic() then. Fails after `timeout`
    seconds (a bound for a broken test, not a timing the test relies on)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"waited {timeout:g} s for {what}"
        time.sleep(0.002)
    return time.monotonic()


@pytest.fixture(scope="session")
def nfkc_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with an NFKC tokenizer normalizer (fullwidth `＜` reads as `<`), F32."""
    from edge_metastone.converters.convert import convert

    hf = build_tiny_metastone(tmp_path_factory.mktemp("nfkc") / "hf", seed=0, normalizer="NFKC")
    path = tmp_path_factory.mktemp("nfkc-gguf") / "tiny-nfkc-f32.gguf"
    convert(hf, path, "f32")
    return path


@pytest.fixture(scope="module")
def nano():
    """`serve` on the embedded MetaStone-nano (real reasoning steps: step scores stream; its
    thinking is inside think markup), one server per test module."""
    from server_process import ServerProcess

    with ServerProcess("--max-new-tokens", "96") as server:
        yield server
        assert server.stop() == 0
        assert "Traceback" not in server.stderr, server.stderr


@pytest.fixture(scope="module")
def nano_api():
    """The same model through the Python API, with the server's settings."""
    from edge_metastone.reasoner import Reasoner

    with Reasoner(max_new_tokens=96) as r:
        yield r
