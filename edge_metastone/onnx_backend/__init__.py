"""The onnxruntime backend: an ONNX model directory (converters/onnx_export.py) run with the same
protocol, events and step scoring as the llama.cpp engine. Importing it loads onnxruntime."""
