"""The embedded default model, shipped inside the package so the first command works offline."""

from __future__ import annotations

from pathlib import Path

from edge_metastone.errors import BadModelFileError

DEFAULT_MODEL_NAME = "default.gguf"


def default_model_path() -> Path:
    """Path of the embedded default model file."""
    path = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise BadModelFileError(
            f"no embedded default model in this installation ({path} is missing); pass --model FILE.gguf"
        )
    return path
