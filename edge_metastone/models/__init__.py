"""The embedded default model, shipped inside the package so the first command works offline.

MetaStone-nano (examples/nano/build.py): a 6.4M-parameter Qwen2 reasoner for integer arithmetic
with its SPRM head, trained and converted by this repository.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edge_metastone.errors import BadModelFileError

DEFAULT_MODEL_NAME = "default.gguf"


def default_model_path() -> Path:
    """Path of the embedded default model file (package data)."""
    path = Path(str(resources.files(__package__) / DEFAULT_MODEL_NAME))
    if not path.is_file():
        raise BadModelFileError(
            f"no embedded default model in this installation ({path} is missing); pass --model FILE.gguf"
        )
    return path
