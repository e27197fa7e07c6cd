"""KV layout policy: which layout AUTO runs, and how many cells a layout allocates. The llama.cpp
runtime applies it when it builds a cache; the scheduler predicts memory and latency with the same
rule, so a plan and the run it describes agree."""

from __future__ import annotations

from edge_metastone.types import KVLayout, KVType

KV_PAD = 256  # llama.cpp pads a KV cache (each stream of it) to a multiple of this many cells
# AUTO runs streams while k prompt copies keep the cache within this many times the unified one
STREAMS_MAX_CELLS_RATIO = 1.5
# Plain attention (flash attention off) holds a score matrix of n_heads x cells x batch rows in F32
# per graph; up to this size the engine runs it, above it flash attention (which holds none).
# Plain attention is what stock llama-cpp-python runs by default, and on a CPU it is the faster
# of the two at these sizes (bench/real_model_speed.py: bench/results/real_model_speed.txt).
PLAIN_ATTENTION_MAX_BYTES = 64 * 2**20


def pad_cells(n: int) -> int:
    """`n` cells rounded up as llama.cpp sizes a KV cache (or one stream of it)."""
    return -(-n // KV_PAD) * KV_PAD


def kv_cells(prompt_tokens: int, max_new_tokens: int, k: int, layout: KVLayout) -> int:
    """KV cells llama.cpp allocates for k candidates in `layout` (as the engine sizes them)."""
    if resolve_layout(layout, k, prompt_tokens, max_new_tokens) is KVLayout.STREAMS:
        return k * pad_cells(prompt_tokens + max_new_tokens)
    return pad_cells(prompt_tokens + k * max_new_tokens)


def resolve_layout(
    layout: KVLayout, k: int, prompt_tokens: int = 0, max_new_tokens: int = 0
) -> KVLayout:
    """The layout AUTO runs for k candidates of max_new_tokens after a prompt.

    Streams for k >= 2: they were never slower (bench/long_reasoning.py: 0.84x of unified's time
    at k=8 x 512 tokens down to 0.40x at k=32 x 4,096; even at k=2 x 128). But each stream holds
    its own copy of the prompt, so when the k copies would make the cache more than 1.5x the
    unified one (a prompt longer than about half the generation) AUTO keeps the unified cache.
    (llama.cpp's padding of each stream to 256 cells is left out of the comparison: at most 255
    cells a candidate, it would rule out streams for every short generation.) One candidate:
    unified, the same work without the padding. Under a memory budget the scheduler names the
    layout itself.
    """
    if layout is not KVLayout.AUTO:
        return layout
    if k < 2:
        return KVLayout.UNIFIED
    streams = k * (prompt_tokens + max_new_tokens)
    unified = prompt_tokens + k * max_new_tokens
    return KVLayout.STREAMS if streams <= STREAMS_MAX_CELLS_RATIO * unified else KVLayout.UNIFIED


def score_matrix_bytes(n_heads: int, n_ctx: int, n_batch: int, n_streams: int = 1) -> int:
    """What plain attention adds to a graph of `n_batch` rows: the F32 scores of each head and an
    F32 mask, each row over the cells of its own stream (`n_ctx` cells split into `n_streams`)."""
    return 4 * (n_heads + 1) * (n_ctx // max(1, n_streams)) * n_batch


def flash_attention(
    kv_type: KVType, n_heads: int, n_ctx: int, n_batch: int, n_streams: int = 1
) -> bool:
    """Whether a generation context runs flash attention: always for a quantized cache (llama.cpp
    needs it for a quantized V), else only when plain attention's score matrix would be large."""
    if KVType(kv_type) is not KVType.F16:
        return True
    return score_matrix_bytes(n_heads, n_ctx, n_batch, n_streams) > PLAIN_ATTENTION_MAX_BYTES
