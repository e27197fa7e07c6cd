"""Repack mode's placement: `tensor_buft_overrides` that put each matmul weight CPU_REPACK takes
there (llama.cpp's own `supports_op` decides which), applied to a `llama_model_params`."""

from __future__ import annotations

import ctypes
import re
from collections import defaultdict
from pathlib import Path

from edge_metastone.engine.weights.build import ggml, tensor_table
from edge_metastone.engine.weights.decision import REPACK, WeightPlan
from edge_metastone.types import WeightBuffers

# The tensors llama.cpp runs through GGML_OP_MUL_MAT in every architecture (llama-arch.cpp's
# LLM_TENSOR_INFOS): only these may be re-laid; a norm or an embedding read by get_rows may not.
_MATMUL_WEIGHT = re.compile(
    r"^(?:blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down"
    r"|ffn_gate_shexp|ffn_up_shexp|ffn_down_shexp)|output)\.weight$"
)


def repack_patterns(path: Path | str) -> tuple[list[str], int]:
    """Regexes naming every matmul weight of `path` that CPU_REPACK takes on this machine, one
    per tensor kind (`^blk\\.(?:0|1|5)\\.ffn_down\\.weight$`), as llama.cpp's own check says;
    and how many weights they name."""
    g = ggml()
    buft = g.extra_bufts().get(REPACK)
    if not buft:
        return [], 0
    layers: dict[str, list[str]] = defaultdict(list)
    checked: dict[tuple[int, int, int], bool] = {}
    for name, ggml_type, shape in tensor_table(path):
        m = _MATMUL_WEIGHT.match(name)
        if m is None or shape[2:] != (1, 1):
            continue
        key = (ggml_type, shape[0], shape[1])
        if key not in checked:
            checked[key] = g.supports_matmul(buft, *key)
        if checked[key]:
            layers[m.group(2) or "output"].append(m.group(1) or "")
    patterns = []
    for kind, ids in layers.items():
        if kind == "output":
            patterns.append(r"^output\.weight$")
        else:
            patterns.append(rf"^blk\.(?:{'|'.join(ids)})\.{kind}\.weight$")
    return patterns, sum(len(ids) for ids in layers.values())


class _Override(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class Placement:
    """A plan applied to `llama_model_params`; keeps the override array alive for the load."""

    def __init__(self, plan: WeightPlan, patterns: list[str]) -> None:
        self.plan = plan
        self.patterns = patterns
        self._keep: object = None

    def apply(self, params: object) -> None:
        """Set `use_extra_bufts` and `tensor_buft_overrides` on a llama_model_params."""
        params.use_extra_bufts = self.plan.mode is WeightBuffers.EXTRA
        if self.plan.mode is not WeightBuffers.REPACK or not self.patterns:
            params.tensor_buft_overrides = None
            return
        buft = ggml().extra_bufts()[REPACK]
        arr = (_Override * (len(self.patterns) + 1))()
        encoded = [p.encode() for p in self.patterns]
        for i, p in enumerate(encoded):
            arr[i].pattern, arr[i].buft = p, buft
        self._keep = (arr, encoded)
        params.tensor_buft_overrides = ctypes.addressof(arr)
