"""Write the SPRM head into a GGUF: a head-only sidecar, or the keys a model copy replaces."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from edge_metastone import keys
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.gguf_io import ArrayGGUFWriter, add_head_keys, add_step_keys, atomic_output
from edge_metastone.sprm import SprmHead, StepRule

# Keys a head (or a model copy with a new head) replaces; everything else is copied unchanged.
_HEAD_KEYS = (
    keys.SPRM_VERSION,
    keys.SPRM_FEATURE_LAYER,
    keys.SPRM_HIDDEN_SIZE,
    keys.SPRM_INNER_SIZE,
    keys.SPRM_DTYPE,
    *keys.SPRM_ARRAYS,
    keys.STEP_TOKEN_IDS,
    keys.THINK_START_ID,
    keys.THINK_END_ID,
    keys.SPRM_TRAINED_WITH,
)


def _write_head(writer: ArrayGGUFWriter, head: SprmHead, rule: StepRule) -> None:
    arrays = (head.fc1_weight, head.fc1_bias, head.fc2_weight, head.fc2_bias)
    add_head_keys(writer, arrays, head.dtype, head.feature_layer)
    add_step_keys(writer, sorted(rule.step_token_ids), rule.think_start_id, rule.think_end_id)


def write_head_sidecar(
    path: Path | str,
    head: SprmHead,
    rule: StepRule,
    *,
    arch: str = "qwen2",
    extra: Mapping[str, str] | None = None,
    backbone: tuple[str, int] | None = None,
) -> Path:
    """Write a head-only GGUF (SPEC §2 keys, no tensors) from arrays, atomically. `backbone`:
    the (name, block count) of the model it belongs to, written as the general keys."""
    path = Path(path)
    if not rule.step_token_ids:
        raise EdgeMetastoneError("a head needs its step delimiter ids")
    with atomic_output(path) as tmp:
        writer = ArrayGGUFWriter(tmp, arch)
        if backbone is not None:
            writer.add_name(backbone[0])
            writer.add_embedding_length(head.hidden_size)
            writer.add_block_count(backbone[1])
        _write_head(writer, head, rule)
        for key, value in (extra or {}).items():
            writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    return path
