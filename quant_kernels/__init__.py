"""4-bit and 8-bit ggml quant formats: bindings to ggml's own kernels and numpy references."""
