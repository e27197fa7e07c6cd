"""Open a model on the runtime it needs: a GGUF file on llama.cpp, an ONNX model directory on
onnxruntime. Nothing is imported from either runtime until a model asks for it."""

from __future__ import annotations

from pathlib import Path

from edge_metastone.backend import Backend
from edge_metastone.errors import BadModelFileError

GGUF_MAGIC = b"GGUF"
ONNX_MODEL_NAME = "model.onnx"


def model_kind(path: Path) -> str:
    """'gguf' or 'onnx' by what is at `path` (its content, not its name); a clear error otherwise."""
    if path.is_dir():
        if (path / ONNX_MODEL_NAME).is_file():
            return "onnx"
        raise BadModelFileError(
            f"{path} is a directory without {ONNX_MODEL_NAME}: not an ONNX model directory"
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise BadModelFileError(f"no such model file: {path}") from None
    except OSError as e:
        raise BadModelFileError(f"cannot read {path}: {e.strerror or e}") from None
    if magic == GGUF_MAGIC:
        return "gguf"
    raise BadModelFileError(f"{path} is neither a GGUF file nor an ONNX model directory")


def open_backend(
    model: Path | str,
    *,
    head: Path | str | None = None,
    n_threads: int = 0,
    n_gpu_layers: int = 0,
    parity: bool = False,
    weight_buffers: str | None = None,
) -> Backend:
    """Open `model` on the runtime it needs: a GGUF file on llama.cpp, an ONNX model directory on
    onnxruntime."""
    path = Path(model)
    kind = model_kind(path)
    if kind == "onnx":
        if head is not None:
            raise BadModelFileError("a sidecar head (--head) is for GGUF files, not ONNX models")
        try:
            from edge_metastone.onnx_backend.backend import OnnxBackend  # loads onnxruntime
        except ImportError as e:
            raise BadModelFileError(
                f"{path} is an ONNX model directory and onnxruntime is not installed "
                f"({e.name or e}): pip install 'edge-metastone[onnx]'"
            ) from None
        # --gpu-layers asks for the GPU: CUDA or a clear error; otherwise CUDA when present
        return OnnxBackend(path, n_threads=n_threads, provider="cuda" if n_gpu_layers else None)
    from edge_metastone.engine.engine import Engine  # loads llama.cpp

    return Engine(
        path,
        head_path=head,
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        parity=parity,
        weight_buffers=weight_buffers,
    )
