"""`edge-metastone serve` in a subprocess, as a user runs it: its URL, health, memory and CPU time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`edge-metastone serve --port 0 ARGS`; the URL is read from its first line of output.
    `env`: extra environment variables (e.g. the API key)."""

    def __init__(
        self, *args: str, startup_s: float = 60.0, env: dict[str, str] | None = None
    ) -> None:
        self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the object)
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115
        inherited = {k: v for k, v in os.environ.items() if k != "EDGE_METASTONE_API_KEY"}
        env = dict(inherited, PYTHONPATH=str(REPO), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_metastone", "serve", "--port", "0", *args],
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        deadline = time.monotonic() + startup_s
        while True:
            match = re.search(r"on http://127\.0\.0\.1:(\d+)/", self.stdout)
            if match:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start: {self.stdout}\n{self.stderr}")
            time.sleep(0.05)
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.returncode: int | None = None

    @property
    def stdout(self) -> str:
        self._out.seek(0)
        return self._out.read()

    @property
    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for(self, predicate, timeout: float = 10.0) -> dict:
        """Poll /health until `predicate(health)` holds; return that health."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            assert time.monotonic() < deadline, f"timed out waiting; last health: {h}"
            time.sleep(0.02)

    def status_kb(self, field: str) -> int:
        """A memory figure of the process from /proc (VmRSS, VmHWM), in KiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the exit code."""
        if self.returncode is None:
            self.proc.send_signal(sig)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.returncode = self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc.poll() is None:
                self.stop()
        finally:
            self.kill()
