"""Where the package keeps what it learns about a machine, and how it writes a small file there
or anywhere: whole or not at all (no backend imports here)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def cache_dir() -> Path:
    """Where calibrations and canary verdicts are cached ($EDGE_METASTONE_CACHE or
    ~/.cache/edge-metastone)."""
    return Path(os.environ.get("EDGE_METASTONE_CACHE", Path.home() / ".cache" / "edge-metastone"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file beside it, renamed into place: a
    reader sees the old file or the new one whole, and the temporary file is removed on any
    error, Ctrl-C included."""
    # a name of its own per writer (two processes may cache the same verdict at once)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
