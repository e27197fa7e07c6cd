"""GGUF writing for the converter: the head and step facts of a Hugging Face checkpoint."""

from __future__ import annotations

from edge_metastone.converters.hf_checkpoint import SprmHeadWeights, TokenizerFacts
from edge_metastone.gguf_io import ArrayGGUFWriter, add_head_keys, add_step_keys


def add_sprm_head(
    writer: ArrayGGUFWriter, head: SprmHeadWeights, feature_layer: int, facts: TokenizerFacts
) -> None:
    """Write the SPEC §2 keys: the head arrays (exact, f32 or f16 bit patterns) and the step ids."""
    arrays = (head.fc1_weight, head.fc1_bias, head.fc2_weight, head.fc2_bias)
    add_head_keys(writer, arrays, head.dtype, feature_layer)
    add_step_facts(writer, facts)


def add_step_facts(writer: ArrayGGUFWriter, facts: TokenizerFacts) -> None:
    """Write the delimiter ids and the think ids (useful with or without a head)."""
    add_step_keys(writer, facts.step_token_ids, facts.think_start_id, facts.think_end_id)
