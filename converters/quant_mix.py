"""Which ggml type each tensor gets, following llama.cpp's own quantizer (src/llama-quant.cpp).

Only the output types this package writes are modelled (f32, f16, q8_0, q4_0, q4_k_m) for the
dense qwen2 architecture; the test suite checks the result tensor by tensor against
llama.cpp's `llama_model_quantize` on the same model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

T = GGMLQuantizationType


class OutType(str, enum.Enum):
    """The `--outtype` choices."""

    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"

    @property
    def file_type(self) -> LlamaFileType:
        """The `general.file_type` llama.cpp records for this mix."""
        return {
            OutType.F32: LlamaFileType.ALL_F32,
            OutType.F16: LlamaFileType.MOSTLY_F16,
            OutType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
            OutType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
            OutType.Q4_K_M: LlamaFileType.MOSTLY_Q4_K_M,
        }[self]

    @property
    def default_type(self) -> GGMLQuantizationType:
        """The type of an ordinary 2-D weight before the per-tensor rules."""
        return {
            OutType.F32: T.F32,
            OutType.F16: T.F16,
            OutType.Q8_0: T.Q8_0,
            OutType.Q4_0: T.Q4_0,
            OutType.Q4_K_M: T.Q4_K,
        }[self]

    @property
    def is_quantized(self) -> bool:
        """True for the block-quantized mixes."""
        return self not in (OutType.F32, OutType.F16)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


@dataclass
class TypeMix:
    """Stateful chooser: call `choose` once per tensor, in file order, as llama.cpp's quantizer does."""

    out: OutType
    n_layers: int
    n_attn_v: int
    tied_embeddings: bool
    _i_attn_v: int = field(default=0, init=False)
    _i_ffn_down: int = field(default=0, init=False)

    def choose(self, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        """The ggml type for tensor `name` of numpy shape `shape` ([rows, cols] for a matrix)."""
        if len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight"):
            return T.F32
        if not self.out.is_quantized:
            return self.out.default_type
        new = self.out.default_type
        ncols = shape[-1]
        if name == "output.weight" or (self.tied_embeddings and name == "token_embd.weight"):
            if ncols % GGML_QUANT_SIZES[new][0] != 0:
                new = T.Q8_0
            elif new != T.Q8_0:
                new = T.Q6_K
        elif ".attn_v." in name:
            if self.out is OutType.Q4_K_M and _use_more_bits(self._i_attn_v, self.n_attn_v):
                new = T.Q6_K
            self._i_attn_v += 1
        elif ".ffn_down." in name:
            if self.out is OutType.Q4_K_M and _use_more_bits(self._i_ffn_down, self.n_layers):
                new = T.Q6_K
            self._i_ffn_down += 1
        return self._fallback(new, ncols)

    @staticmethod
    def _fallback(new: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
        if ncols % GGML_QUANT_SIZES[new][0] == 0:
            return new
        new = _FALLBACK.get(new, new)
        return new if ncols % GGML_QUANT_SIZES[new][0] == 0 else T.F16
