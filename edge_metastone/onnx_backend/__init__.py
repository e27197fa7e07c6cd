"""The onnxruntime backend: an ONNX model directory (converters/onnx_export.py) run with the same
protocol, events and step scoring as the llama.cpp engine. Importing it loads onnxruntime."""

from __future__ import annotations

from edge_metastone.onnx_backend.backend import OnnxBackend

__all__ = ["OnnxBackend"]
