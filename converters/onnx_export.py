"""Export a Hugging Face MetaStone/Qwen2 checkpoint to an ONNX model directory (SPEC §2).

The decoder graph is written directly with the `onnx` package from the checkpoint's weights, in
optimum's decoder-with-past layout (`input_ids`, `past_key_values.{i}.key/value` in,
`logits`, `present.{i}.key/value` out), plus three things optimum's export has no place for:

- `sprm_logits` [B, S]: the SPRM head's step *logits* (before the sigmoid) on the residual stream
  after decoder layer L-2 at every position; the runtime applies the sigmoid;
- `sprm_features` [B, S, C]: that residual stream itself (train-sprm keeps it);
- `logits_to_keep` [1] (input): logits only for the last n positions, so a prefill does not
  materialise [S, vocab] logits it never reads.

optimum-onnx itself is not used: every release on PyPI pins transformers < 4.58 and optimum
~= 2.1, which pip cannot install beside this project's transformers 5; writing the graph
from the weights also needs no transformers at all and keeps the exported math what the
parity test checks against HF transformers.

`int4` quantizes every decoder MatMul and the embedding Gather with onnxruntime's `MatMulNBits`
quantizer (4-bit, symmetric, blocks of 32 as ggml's Q4_0, int8 activations at run time as
llama.cpp's Q4_0 dot product does); the output projection gets 8 bits (llama.cpp gives it Q6_K) and
the SPRM head stays float32.

Layout of DIR: `model.onnx` + `model.onnx.data` (external weights), `metastone.json` (the SPEC §2
facts under their GGUF key names, and what the runtime needs: sizes, special and end-of-turn ids,
chat template), `tokenizer.json` and `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_metastone import keys
from edge_metastone.converters.hf_checkpoint import (
    Qwen2Config,
    SafetensorsCheckpoint,
    SprmHeadWeights,
    read_config,
    read_head,
    read_tokenizer_facts,
)
from edge_metastone.converters.vocab import normal_form, read_special_tokens
from edge_metastone.errors import BadCheckpointError

logger = logging.getLogger(__name__)

OPSET = 21  # int4 Gather weights need opset 21 (IR 10)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "metastone.json"
FORMAT = "edge-metastone-onnx"
FORMAT_VERSION = 1
OUT_TYPES = ("f32", "int4")
INT4_BLOCK = 32
# Texts llama.cpp treats as end of generation when they are in the vocabulary (llama-vocab.cpp),
# so both runtimes stop on the same tokens.
EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_text|>",
)
HEAD_NODES = ("sprm.fc1", "sprm.fc2")
LM_HEAD_NODE = "lm_head"


@dataclass(frozen=True)
class OnnxExportResult:
    """What `export_onnx` wrote."""

    path: Path
    out_type: str
    n_bytes: int
    has_head: bool


class _Graph:
    """A tiny builder over onnx.helper: nodes, initializers, graph inputs and outputs and unique
    names."""

    def __init__(self) -> None:
        from onnx import helper

        self.h = helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        self._n += 1
        node_name = name or f"{op_type.lower()}_{self._n}"
        out = f"{node_name}/out"
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))


def _rms_norm(g: _Graph, x: str, weight: np.ndarray, eps_name: str, name: str) -> str:
    """HF Qwen2RMSNorm: x * rsqrt(mean(x^2) + eps) * w, in float32."""
    w = g.const(f"{name}.weight", weight.astype(np.float32))
    ms = g.op("ReduceMean", [g.op("Mul", [x, x]), "axes_last"], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps_name])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), w], name=f"{name}.out")


def _linear(g: _Graph, x: str, weight: np.ndarray, bias: np.ndarray | None, name: str) -> str:
    """x @ W^T (+ b), with W stored transposed ([in, out]) as MatMulNBits quantizes it."""
    wt = g.const(f"{name}.weight_t", np.ascontiguousarray(weight.T, dtype=np.float32))
    y = g.op("MatMul", [x, wt], name=name)
    if bias is not None:
        y = g.op("Add", [y, g.const(f"{name}.bias", bias.astype(np.float32))])
    return y


def _rope(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin over the last axis ([.., hd])."""
    x1 = g.op("Slice", [x, "zero1", f"half_{half}", "axes_last"])
    x2 = g.op("Slice", [x, f"half_{half}", "int_max", "axes_last"])
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


class _Weights:
    """Whole tensors of the checkpoint as float32."""

    def __init__(self, ckpt: SafetensorsCheckpoint) -> None:
        self.ckpt = ckpt
        self.names = set(ckpt.names())

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise BadCheckpointError(f"the checkpoint lacks tensor {name}")
        rows = list(self.ckpt.rows_f32(name))
        shape = self.ckpt.shape(name)
        return np.concatenate(rows).reshape(shape) if len(rows) > 1 else rows[0].reshape(shape)

    def maybe(self, name: str) -> np.ndarray | None:
        return self(name) if name in self.names else None


def _check_rope(cfg: Qwen2Config) -> None:
    """Refuse rope scaling: the graph computes plain RoPE only."""
    if cfg.rope_scaling:
        raise BadCheckpointError(
            f"rope scaling {cfg.rope_scaling.get('rope_type', cfg.rope_scaling.get('type'))!r} "
            "is not supported by the ONNX export (convert to GGUF instead)"
        )


def _add_constants(g: _Graph, cfg: Qwen2Config) -> None:
    """The shared shape, axis and scalar constants and RoPE's inverse frequencies."""
    c, n_h, n_kv = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads
    hd, rep = c // n_h, n_h // n_kv
    for name, vals in {
        "axes_last": [-1],
        "axes_0": [0],
        "axes_1": [1],
        "zero1": [0],
        "one1": [1],
        "two1": [2],
        "three1": [3],
        "int_max": [2**62],
        f"half_{hd // 2}": [hd // 2],
        "shape_q": [0, 0, n_h, hd],
        "shape_kv": [0, 0, n_kv, hd],
        "shape_gqa": [0, n_kv, rep, -1, hd],
        "shape_heads": [0, n_h, -1, hd],
        "shape_c": [0, 0, c],
    }.items():
        g.ints(name, vals)
    g.const("eps", np.asarray(cfg.rms_norm_eps, dtype=np.float32))
    g.const("scale", np.asarray(1.0 / math.sqrt(hd), dtype=np.float32))
    g.const("zero_f", np.asarray(0.0, dtype=np.float32))
    g.const("neg_inf", np.asarray(-np.inf, dtype=np.float32))
    g.const("zero_i", np.asarray(0, dtype=np.int64))
    g.const("one_i", np.asarray(1, dtype=np.int64))
    inv_freq = 1.0 / (
        cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd)
    )
    g.const("inv_freq", inv_freq.astype(np.float32)[None, :])  # [1, hd/2]


def _positions(g: _Graph) -> tuple[str, str, str]:
    """RoPE's cos and sin [S, hd] at positions P..P+S-1 (P = past length, every row of the batch
    is at the same position) and the causal mask [S, T]."""
    from onnx import TensorProto

    s_len = g.op(
        "Squeeze", [g.op("Slice", [g.op("Shape", ["input_ids"]), "one1", "two1"]), "zero1"]
    )
    past_shape = g.op("Shape", ["past_key_values.0.key"])
    past = g.op("Squeeze", [g.op("Slice", [past_shape, "two1", "three1"]), "zero1"])
    total = g.op("Add", [past, s_len])
    pos = g.op("Range", [past, total, "one_i"])  # [S]
    pos_f = g.op("Unsqueeze", [g.op("Cast", [pos], to=TensorProto.FLOAT), "axes_1"])  # [S, 1]
    freqs = g.op("MatMul", [pos_f, "inv_freq"])  # [S, hd/2]
    emb = g.op("Concat", [freqs, freqs], axis=-1)  # [S, hd]
    cos, sin = g.op("Cos", [emb], name="rope.cos"), g.op("Sin", [emb], name="rope.sin")
    # causal mask [S, T]: query i (at P+i) sees key j when j <= P+i
    rows = g.op("Unsqueeze", [g.op("Range", [past, total, "one_i"]), "axes_1"])
    cols = g.op("Unsqueeze", [g.op("Range", ["zero_i", total, "one_i"]), "axes_0"])
    mask = g.op("Where", [g.op("LessOrEqual", [cols, rows]), "zero_f", "neg_inf"], name="mask")
    return cos, sin, mask


def _kv_cache(g: _Graph, cfg: Qwen2Config, i: int, k: str, v: str) -> tuple[str, str]:
    """Layer i's past keys/values (inputs) joined with the new ones (the `present` outputs)."""
    from onnx import TensorProto, helper

    n_kv, hd = cfg.n_kv_heads, cfg.hidden_size // cfg.n_heads
    pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    for name in (pk, pv):
        g.inputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n_kv, "past_seq", hd])
        )
    k_all = g.op("Concat", [pk, k], axis=2, name=f"present.{i}.key")  # [B,kv,T,hd]
    v_all = g.op("Concat", [pv, v], axis=2, name=f"present.{i}.value")
    for name, src in ((f"present.{i}.key", k_all), (f"present.{i}.value", v_all)):
        g.nodes.append(helper.make_node("Identity", [src], [name], name=f"{name}.out"))
        g.outputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n_kv, "total_seq", hd])
        )
    return k_all, v_all


def _attention(
    g: _Graph, cfg: Qwen2Config, weights: _Weights, i: int, h: str, rope: tuple[str, str, str]
) -> str:
    """Layer i's grouped-query self-attention on the normed stream `h`, through o_proj."""
    p, hd = f"model.layers.{i}.self_attn", cfg.hidden_size // cfg.n_heads
    cos, sin, mask = rope
    q, k, v = (
        _linear(
            g,
            h,
            weights(f"{p}.{n}_proj.weight"),
            weights.maybe(f"{p}.{n}_proj.bias"),
            f"layers.{i}.{n}_proj",
        )
        for n in "qkv"
    )
    q = g.op("Transpose", [g.op("Reshape", [q, "shape_q"])], perm=[0, 2, 1, 3])  # [B,H,S,hd]
    k = g.op("Transpose", [g.op("Reshape", [k, "shape_kv"])], perm=[0, 2, 1, 3])  # [B,kv,S,hd]
    v = g.op("Transpose", [g.op("Reshape", [v, "shape_kv"])], perm=[0, 2, 1, 3])
    q, k = _rope(g, q, cos, sin, hd // 2), _rope(g, k, cos, sin, hd // 2)
    k_all, v_all = _kv_cache(g, cfg, i, k, v)
    # grouped-query attention: query heads h = kv * rep + r share kv head `kv`
    q5 = g.op("Reshape", [q, "shape_gqa"])  # [B,kv,rep,S,hd]
    k5 = g.op("Transpose", [g.op("Unsqueeze", [k_all, "two1"])], perm=[0, 1, 2, 4, 3])
    v5 = g.op("Unsqueeze", [v_all, "two1"])  # [B,kv,1,T,hd]
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q5, k5]), "scale"]), mask])
    attn = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v5])  # [B,kv,rep,S,hd]
    attn = g.op("Reshape", [attn, "shape_heads"])  # [B,H,S,hd]
    attn = g.op("Reshape", [g.op("Transpose", [attn], perm=[0, 2, 1, 3]), "shape_c"])
    return _linear(g, attn, weights(f"{p}.o_proj.weight"), None, f"layers.{i}.o_proj")


def _mlp(g: _Graph, weights: _Weights, i: int, h: str) -> str:
    """Layer i's SwiGLU MLP on the normed stream `h`, through down_proj."""
    p = f"model.layers.{i}.mlp"
    gate = _linear(g, h, weights(f"{p}.gate_proj.weight"), None, f"layers.{i}.gate_proj")
    up = _linear(g, h, weights(f"{p}.up_proj.weight"), None, f"layers.{i}.up_proj")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
    return _linear(g, act, weights(f"{p}.down_proj.weight"), None, f"layers.{i}.down_proj")


def _layer(
    g: _Graph, cfg: Qwen2Config, weights: _Weights, i: int, x: str, rope: tuple[str, str, str]
) -> str:
    """Decoder layer i on the residual stream `x`; returns the stream after it."""
    p = f"model.layers.{i}"
    h = _rms_norm(g, x, weights(f"{p}.input_layernorm.weight"), "eps", f"layers.{i}.ln1")
    x = g.op("Add", [x, _attention(g, cfg, weights, i, h, rope)], name=f"layers.{i}.attn_residual")
    h = _rms_norm(g, x, weights(f"{p}.post_attention_layernorm.weight"), "eps", f"layers.{i}.ln2")
    return g.op("Add", [x, _mlp(g, weights, i, h)], name=f"layers.{i}.out")


def _sprm_outputs(g: _Graph, cfg: Qwen2Config, feature: str, head: SprmHeadWeights | None) -> None:
    """`sprm_features` (the residual stream `feature`) and, with a head, `sprm_logits`."""
    from onnx import TensorProto, helper

    g.nodes.append(helper.make_node("Identity", [feature], ["sprm_features"], name="features"))
    g.outputs.append(
        helper.make_tensor_value_info(
            "sprm_features", TensorProto.FLOAT, ["batch", "seq", cfg.hidden_size]
        )
    )
    if head is None:
        return
    h1 = _linear(g, feature, head.fc1_weight.astype(np.float32), head.fc1_bias, HEAD_NODES[0])
    h1 = g.op("Relu", [h1])
    z = _linear(g, h1, head.fc2_weight.astype(np.float32)[None, :], head.fc2_bias, HEAD_NODES[1])
    g.nodes.append(
        helper.make_node("Squeeze", [z, "axes_last"], ["sprm_logits"], name="sprm.logits")
    )
    g.outputs.append(
        helper.make_tensor_value_info("sprm_logits", TensorProto.FLOAT, ["batch", "seq"])
    )


def _lm_head(g: _Graph, cfg: Qwen2Config, weights: _Weights, x: str, embed: np.ndarray) -> None:
    """The final norm and output projection: `logits` of the last `logits_to_keep` positions."""
    from onnx import TensorProto, helper

    g.inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    tail = g.op("Slice", [x, g.op("Neg", ["logits_to_keep"]), "int_max", "axes_1"])
    h = _rms_norm(g, tail, weights("model.norm.weight"), "eps", "final_norm")
    lm = embed if cfg.tied_embeddings else weights("lm_head.weight")
    wt = g.const("lm_head.weight_t", np.ascontiguousarray(lm.T, dtype=np.float32))
    g.nodes.append(helper.make_node("MatMul", [h, wt], ["logits"], name=LM_HEAD_NODE))
    g.outputs.insert(
        0,
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", "kept_seq", cfg.vocab_size]
        ),
    )


def build_graph(cfg: Qwen2Config, weights: _Weights, head: SprmHeadWeights | None) -> Any:
    """The float32 decoder-with-past graph (a ModelProto) with the SPRM outputs."""
    from onnx import TensorProto, helper

    _check_rope(cfg)
    feature_layer = cfg.n_layers - 2
    g = _Graph()
    _add_constants(g, cfg)
    rope = _positions(g)
    embed = weights("model.embed_tokens.weight")
    x = g.op("Gather", [g.const("model.embed_tokens.weight", embed), "input_ids"], name="embed")
    g.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
    feature = None
    for i in range(cfg.n_layers):
        x = _layer(g, cfg, weights, i, x, rope)
        if i == feature_layer:
            feature = x
    assert feature is not None
    _sprm_outputs(g, cfg, feature, head)
    _lm_head(g, cfg, weights, x, embed)
    graph = helper.make_graph(g.nodes, "metastone_decoder", g.inputs, g.outputs, g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge-metastone",
        ir_version=10,
    )
    return model


def _quantize_int4(model: Any) -> Any:
    """MatMulNBits: 4-bit decoder MatMuls and embedding Gather, 8-bit output projection; the
    SPRM head stays float32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    def run(model: Any, bits: int, ops: tuple[str, ...], exclude: list[str], include: Any) -> Any:
        cfg = DefaultWeightOnlyQuantConfig(
            block_size=INT4_BLOCK,
            is_symmetric=True,
            accuracy_level=4,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=bits,
        )
        q = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=INT4_BLOCK,
            is_symmetric=True,
            accuracy_level=4,
            nodes_to_exclude=exclude,
            nodes_to_include=include,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            algo_config=cfg,
        )
        q.process()
        return q.model.model

    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = qlog.level
    qlog.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        model = run(model, 4, ("MatMul", "Gather"), [*HEAD_NODES, LM_HEAD_NODE], None)
        return run(model, 8, ("MatMul",), list(HEAD_NODES), [LM_HEAD_NODE])
    finally:
        qlog.setLevel(level)


def _special_facts(hf_dir: Path, vocab_size: int) -> dict[str, Any]:
    """bos/eos ids and texts, end-of-generation ids and the chat template, read as the GGUF
    converter reads them (gguf's SpecialVocab), so both model formats agree."""
    import gguf

    special = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=vocab_size)
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_text = {a["content"]: int(a["id"]) for a in tj.get("added_tokens", [])}
    text_of = {i: t for t, i in by_text.items()}
    bos = special.special_token_ids.get("bos")
    eos = special.special_token_ids.get("eos")
    eog = {int(eos)} if eos is not None else set()
    eog |= {by_text[t] for t in EOG_TEXTS if t in by_text}
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "bos_token": text_of.get(bos, "") if bos is not None else "",
        "eos_token": text_of.get(eos, "") if eos is not None else "",
        "eog_token_ids": sorted(eog),
        "chat_template": template,
    }


def _metadata(
    cfg: Qwen2Config, hf_dir: Path, head: SprmHeadWeights | None, out_type: str
) -> dict[str, Any]:
    facts = read_tokenizer_facts(hf_dir)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "out_type": out_type,
        "name": cfg.name,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        keys.STEP_TOKEN_IDS: list(facts.step_token_ids),
        keys.THINK_START_ID: facts.think_start_id,
        keys.THINK_END_ID: facts.think_end_id,
        **_special_facts(hf_dir, cfg.vocab_size),
        # the chat template's variables and the tokenizer's normal form, as in a GGUF
        keys.TOKENIZER_SPECIAL_TOKENS: read_special_tokens(hf_dir),
        keys.TOKENIZER_NORMALIZER: normal_form(
            json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")).get("normalizer")
        ),
    }
    if head is not None:
        meta |= {
            keys.SPRM_VERSION: keys.SPRM_FORMAT_VERSION,
            keys.SPRM_FEATURE_LAYER: cfg.n_layers - 2,
            keys.SPRM_HIDDEN_SIZE: cfg.hidden_size,
            keys.SPRM_INNER_SIZE: 2 * cfg.hidden_size,
            keys.SPRM_DTYPE: "f32",
            "sprm_output": "sprm_logits",  # step logits; score = sigmoid(logit)
        }
    return meta


OUR_FILES = frozenset((MODEL_FILE, DATA_FILE, META_FILE, "tokenizer.json", "tokenizer_config.json"))


def _replaceable(path: Path) -> bool:
    """An output directory may be replaced when it is absent, empty, or an ONNX model directory
    this exporter wrote: our `metastone.json` format, and nothing in it but our files."""
    if not path.exists():
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    entries = list(path.iterdir())
    if not entries:
        return True
    if any(e.name not in OUR_FILES or not e.is_file() or e.is_symlink() for e in entries):
        return False
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`; an old model there is renamed aside first and
    removed only once the new one is in place (back in place if the swap fails)."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(8)}.old")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    _remove_tree(old)


def _remove_tree(path: Path) -> None:
    """Remove `path` whole, even when a Ctrl-C comes in the middle (it is raised after)."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def export_onnx(
    hf_dir: Path | str, out_dir: Path | str, out_type: str = "int4"
) -> OnnxExportResult:
    """Export `hf_dir` to the ONNX model directory `out_dir` (written beside, then moved in).

    An existing `out_dir` is replaced only when it is an ONNX model directory this exporter wrote
    (nothing else in it); anything else is refused with `BadCheckpointError`, untouched."""
    import onnx

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if out_type not in OUT_TYPES:
        raise BadCheckpointError(f"ONNX outtype must be one of {', '.join(OUT_TYPES)}")
    if not hf_dir.is_dir():
        raise BadCheckpointError(f"{hf_dir} is not a directory")
    if not _replaceable(out_dir):
        raise BadCheckpointError(
            f"{out_dir} exists and is not an ONNX model directory; refusing to overwrite it"
        )
    cfg = read_config(hf_dir)
    head = read_head(hf_dir, cfg.hidden_size)
    meta = _metadata(cfg, hf_dir, head, out_type)
    model = build_graph(cfg, _Weights(SafetensorsCheckpoint(hf_dir)), head)
    if out_type == "int4":
        model = _quantize_int4(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        onnx.save_model(
            model,
            str(tmp / MODEL_FILE),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # written private; a model is not
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if not _replaceable(out_dir):  # it may have changed while the graph was written
            raise BadCheckpointError(
                f"{out_dir} exists and is not an ONNX model directory; refusing to overwrite it"
            )
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            _remove_tree(tmp)
    n_bytes = sum(f.stat().st_size for f in out_dir.iterdir())
    logger.info("wrote %s (%s, %.1f MiB)", out_dir, out_type, n_bytes / 2**20)
    return OnnxExportResult(out_dir, out_type, n_bytes, head is not None)
