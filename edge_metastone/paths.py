"""Where the package keeps what it learns about a machine (no backend imports here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where calibrations and canary verdicts are cached ($EDGE_METASTONE_CACHE or
    ~/.cache/edge-metastone)."""
    return Path(os.environ.get("EDGE_METASTONE_CACHE", Path.home() / ".cache" / "edge-metastone"))
