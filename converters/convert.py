"""Hugging Face MetaStone/Qwen2 checkpoint -> one GGUF, streamed one tensor at a time."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from edge_metastone.converters.gguf_out import add_sprm_head, add_step_facts
from edge_metastone.converters.hf_checkpoint import (
    Qwen2Config,
    SafetensorsCheckpoint,
    read_config,
    read_head,
    read_tokenizer_facts,
)
from edge_metastone.converters.quant_mix import OutType, TypeMix
from edge_metastone.converters.vocab import read_vocabulary
from edge_metastone.errors import BadCheckpointError
from edge_metastone.gguf_io import ArrayGGUFWriter, atomic_output
from edge_metastone.modelfile.head import write_head_sidecar
from edge_metastone.quant_kernels.ggml import quantize
from edge_metastone.sprm import SprmHead, StepRule

logger = logging.getLogger(__name__)

ARCH = gguf.MODEL_ARCH.QWEN2
# Buffers HF keeps in some checkpoints that are not weights.
_SKIP = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it comes from, its GGUF name, shape and type."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        """Bytes in the file for this tensor."""
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * size


@dataclass(frozen=True)
class ConversionResult:
    """What `convert` wrote."""

    path: Path
    out_type: OutType
    n_tensors: int
    n_bytes: int
    has_head: bool


def _block_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    if name.startswith("token_embd"):
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), name)
    return (2, 0, name)


def expected_shape(name: str, cfg: Qwen2Config) -> tuple[int, ...] | None:
    """The numpy shape a qwen2 tensor must have, from the config (None for names not checked)."""
    c, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.n_kv_heads * (c // cfg.n_heads)
    suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
    return {
        "token_embd.weight": (v, c),
        "output.weight": (v, c),
        "output_norm.weight": (c,),
        "attn_norm.weight": (c,),
        "ffn_norm.weight": (c,),
        "attn_q.weight": (c, c),
        "attn_q.bias": (c,),
        "attn_k.weight": (kv, c),
        "attn_k.bias": (kv,),
        "attn_v.weight": (kv, c),
        "attn_v.bias": (kv,),
        "attn_output.weight": (c, c),
        "ffn_gate.weight": (f, c),
        "ffn_up.weight": (f, c),
        "ffn_down.weight": (c, f),
    }.get(suffix)


def plan_tensors(
    ckpt: SafetensorsCheckpoint, cfg: Qwen2Config, out: OutType
) -> list[PlannedTensor]:
    """Map HF names to GGUF names and choose each tensor's type, in the order they will be written."""
    name_map = gguf.get_tensor_name_map(ARCH, cfg.n_layers)
    mapped: list[tuple[str, str, tuple[int, ...]]] = []
    for hf_name in ckpt.names():
        if _SKIP.search(hf_name):
            continue
        if hf_name == "lm_head.weight" and cfg.tied_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadCheckpointError(f"tensor {hf_name} has no place in a qwen2 GGUF")
        shape = ckpt.shape(hf_name)
        want = expected_shape(name, cfg)
        if want is not None and shape != want:
            raise BadCheckpointError(
                f"{hf_name} has shape {list(shape)}, but config.json implies {list(want)}"
            )
        mapped.append((hf_name, name, shape))
    mapped.sort(key=lambda m: _block_key(m[1]))
    names = {m[1] for m in mapped}
    for required in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"):
        if required not in names:
            raise BadCheckpointError(f"the checkpoint lacks {required} (HF equivalent missing)")
    tied = "output.weight" not in names
    mix = TypeMix(
        out=out,
        n_layers=cfg.n_layers,
        n_attn_v=sum(".attn_v.weight" in n for n in names),
        tied_embeddings=tied,
    )
    return [PlannedTensor(h, n, s, mix.choose(n, s)) for h, n, s in mapped]


def _add_hparams(writer: ArrayGGUFWriter, cfg: Qwen2Config, out: OutType) -> None:
    writer.add_name(cfg.name)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        writer.add_rope_scaling_type(
            gguf.RopeScalingType.YARN if kind == "yarn" else gguf.RopeScalingType.LINEAR
        )
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        if "original_max_position_embeddings" in cfg.rope_scaling:
            writer.add_rope_scaling_orig_ctx_len(
                int(cfg.rope_scaling["original_max_position_embeddings"])
            )
    writer.add_file_type(out.file_type)
    if out.is_quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(t: PlannedTensor, data: np.ndarray) -> np.ndarray:
    """One block of whole rows of `t`, in its output type."""
    if data.shape[1:] != t.shape[1:]:
        raise BadCheckpointError(
            f"{t.hf_name} has rows of shape {list(data.shape[1:])}, expected {list(t.shape[1:])}"
        )
    if t.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if t.qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return quantize(t.qtype, data.reshape(-1, t.shape[-1]))


def checkpoint_head_sidecar(hf_dir: Path | str, out_path: Path | str) -> Path:
    """Write only the SPRM head and step ids (a tensor-less GGUF) to sit beside an existing model
    file: the checkpoint's head, written as every sidecar is (`modelfile.head`)."""
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    weights = read_head(hf_dir, cfg.hidden_size)
    if weights is None:
        raise BadCheckpointError(f"{hf_dir} has no SPRM head (score_module.pt) to write")
    facts = read_tokenizer_facts(hf_dir)
    head = SprmHead(
        weights.fc1_weight,
        weights.fc1_bias,
        weights.fc2_weight,
        weights.fc2_bias,
        feature_layer=cfg.n_layers - 2,
        dtype=weights.dtype,
    )
    rule = StepRule.of(facts.step_token_ids, facts.think_start_id, facts.think_end_id)
    return write_head_sidecar(
        out_path, head, rule, arch=gguf.MODEL_ARCH_NAMES[ARCH], backbone=(cfg.name, cfg.n_layers)
    )


def convert(
    hf_dir: Path | str,
    out_path: Path | str,
    out_type: OutType | str = OutType.F16,
    *,
    progress: bool = False,
) -> ConversionResult:
    """Convert `hf_dir` to `out_path`; the file appears only when the whole conversion succeeded."""
    hf_dir, out_path, out = Path(hf_dir), Path(out_path), OutType(out_type)
    if not hf_dir.is_dir():
        raise BadCheckpointError(f"{hf_dir} is not a directory")
    cfg = read_config(hf_dir)
    head = read_head(hf_dir, cfg.hidden_size)
    facts = read_tokenizer_facts(hf_dir)
    vocab = read_vocabulary(hf_dir, cfg.vocab_size)
    ckpt = SafetensorsCheckpoint(hf_dir)
    plan = plan_tensors(ckpt, cfg, out)
    if head is None:
        logger.warning("%s has no SPRM head (score_module.pt): the file will have no head", hf_dir)

    total = sum(t.nbytes for t in plan)
    with atomic_output(out_path) as tmp:
        writer = ArrayGGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
        _add_hparams(writer, cfg, out)
        vocab.add_to(writer)
        if head is not None:
            add_sprm_head(writer, head, cfg.n_layers - 2, facts)
        else:
            add_step_facts(writer, facts)
        for t in plan:
            writer.add_tensor_info(
                t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(
            total=total, unit="B", unit_scale=True, disable=not progress, desc=out_path.name
        ) as bar:
            for t in plan:
                chunks = (_encode(t, rows) for rows in ckpt.rows_f32(t.hf_name))
                writer.write_tensor_chunks(chunks, t.nbytes)
                bar.update(t.nbytes)
        writer.close()
    logger.info("wrote %s (%d tensors, %.1f MiB)", out_path, len(plan), total / 2**20)
    return ConversionResult(out_path, out, len(plan), total, head is not None)
