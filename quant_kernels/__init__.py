"""4-bit and 8-bit ggml quant formats: bindings to ggml's own kernels and numpy references."""

from __future__ import annotations

from quant_kernels import reference
from quant_kernels.ggml import (
    QUANTIZABLE_TYPES,
    GGMLLibrary,
    GGMLType,
    block_size,
    dequantize,
    ggml_library,
    is_quantized,
    quantize,
    requires_imatrix,
    row_size,
    type_name,
    type_size,
    validate_row_data,
)

__all__ = [
    "QUANTIZABLE_TYPES",
    "GGMLLibrary",
    "GGMLType",
    "block_size",
    "dequantize",
    "ggml_library",
    "is_quantized",
    "quantize",
    "reference",
    "requires_imatrix",
    "row_size",
    "type_name",
    "type_size",
    "validate_row_data",
]
