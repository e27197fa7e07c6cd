"""Read a Hugging Face Qwen2 checkpoint: config, weights (streamed), tokenizer, and the SPRM head."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_metastone.errors import BadCheckpointError
from edge_metastone.sprm import STEP_DELIMITER

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")
# Rows of float32 read (and quantized) at once; bounds the converter's working memory.
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Qwen2Config:
    """The hyper-parameters of a Qwen2 decoder that the GGUF needs."""

    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    rope_scaling: dict[str, Any] | None
    name: str

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise BadCheckpointError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise BadCheckpointError(
                f"num_attention_heads {self.n_heads} is not divisible by num_key_value_heads {self.n_kv_heads}"
            )
        if self.n_layers < 2:
            raise BadCheckpointError(
                "the SPRM reads layer L-2, so the model needs at least 2 layers"
            )


@dataclass(frozen=True)
class SprmHeadWeights:
    """The head's four arrays as stored in the checkpoint (float32 or float16, never rounded)."""

    fc1_weight: np.ndarray  # [2C, C]
    fc1_bias: np.ndarray  # [2C]
    fc2_weight: np.ndarray  # [2C]
    fc2_bias: np.ndarray  # [1]

    @property
    def dtype(self) -> str:
        """'f16' when the source is half precision, else 'f32' (bf16 widens exactly)."""
        return "f16" if self.fc1_weight.dtype == np.float16 else "f32"


@dataclass(frozen=True)
class TokenizerFacts:
    """Vocabulary facts the converter writes next to the tokens."""

    step_token_ids: tuple[int, ...]
    think_start_id: int
    think_end_id: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadCheckpointError(f"{path.name} not found in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadCheckpointError(f"{path} is not valid JSON: {e}") from None


def read_config(hf_dir: Path) -> Qwen2Config:
    """Parse config.json, refusing any architecture other than Qwen2ForCausalLM."""
    cfg = _read_json(hf_dir / "config.json")
    archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise BadCheckpointError(
            f"architecture {archs[0]} is not supported: convert writes MetaStone/Qwen2 checkpoints "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}) only; a GGUF of another architecture (llama, "
            "qwen3, gemma, phi3, ...: llama.cpp's convert_hf_to_gguf.py) runs as it is"
        )
    # transformers 5 writes rope settings under "rope_parameters"; 4.x checkpoints use the top level
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or (
        rope_params if rope_params.get("rope_type", "default") != "default" else None
    )
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ("yarn", "linear", "default"):
            raise BadCheckpointError(f"rope_scaling type {kind!r} is not supported")
        if kind == "default":
            rope_scaling = None
    try:
        n_heads = int(cfg["num_attention_heads"])
        return Qwen2Config(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings", 32768)),
            rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 1_000_000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            name=hf_dir.resolve().name,
        )
    except KeyError as e:
        raise BadCheckpointError(f"config.json lacks {e.args[0]}") from None


class SafetensorsCheckpoint:
    """The weights of a checkpoint (single file or sharded with an index), read a few rows at a time.

    Each read opens its shard, copies the rows out and closes it again, so no mapping of the
    checkpoint stays resident: peak memory is one chunk, not the model.
    """

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = _read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise BadCheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {hf_dir}"
            )
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            path = hf_dir / fname
            with self._open(path) as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    self._where[name] = path
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    @staticmethod
    def _open(path: Path) -> Any:
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt")
        except FileNotFoundError:
            raise BadCheckpointError(f"shard {path.name} named by the index is missing") from None
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
            raise BadCheckpointError(f"{path} is not a readable safetensors file: {e}") from None

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading its data."""
        return self._shapes[name]

    def rows_f32(self, name: str, max_bytes: int | None = None) -> Iterator[np.ndarray]:
        """Yield the tensor as float32 blocks of whole rows, each at most ~`max_bytes`."""
        import torch

        max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
        shape = self._shapes[name]
        n_rows = shape[0] if len(shape) > 1 else 1
        row_bytes = 4 * int(np.prod(shape[1:])) if len(shape) > 1 else 4 * int(np.prod(shape))
        step = max(1, max_bytes // max(row_bytes, 1))
        for start in range(0, n_rows, step):
            with self._open(self._where[name]) as handle:
                try:
                    sl = handle.get_slice(name)
                    t = sl[start : start + step] if len(shape) > 1 else sl[:]
                except Exception as e:
                    raise BadCheckpointError(f"cannot read tensor {name}: {e}") from None
                # a copy, so nothing refers to the shard's mapping once it is closed
                yield t.to(torch.float32).numpy().copy()


def _as_numpy_head(state: Any, source: str) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(state, dict):
        raise BadCheckpointError(f"{source} is not a state dict (got {type(state).__name__})")
    keys = sorted(state)
    if keys != sorted(HEAD_KEYS):
        raise BadCheckpointError(f"{source} has keys {keys}, expected {list(HEAD_KEYS)}")
    out: dict[str, np.ndarray] = {}
    for k in HEAD_KEYS:
        v = state[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise BadCheckpointError(f"{source}: {k} is not a floating-point tensor")
        v = v.detach().cpu()
        out[k] = (v.numpy() if v.dtype == torch.float16 else v.to(torch.float32).numpy()).copy()
    return out


def read_head(hf_dir: Path, hidden_size: int) -> SprmHeadWeights | None:
    """Load score_module.pt (weights_only) or score_module.safetensors; None when there is no head."""
    pt, st = hf_dir / "score_module.pt", hf_dir / "score_module.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            raw = _as_numpy_head(load_file(str(st)), st.name)
        except BadCheckpointError:
            raise
        except Exception as e:
            raise BadCheckpointError(f"{st.name} is not a readable safetensors file: {e}") from None
    elif pt.is_file():
        import torch

        try:
            state = torch.load(str(pt), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
            raise BadCheckpointError(
                f"{pt.name} is not a plain state dict; refusing to unpickle it ({first})"
            ) from None
        except Exception as e:
            raise BadCheckpointError(f"{pt.name} cannot be read: {e}") from None
        raw = _as_numpy_head(state, pt.name)
    else:
        return None
    dtypes = {a.dtype for a in raw.values()}
    if len(dtypes) != 1:
        raise BadCheckpointError(f"SPRM head mixes dtypes {sorted(map(str, dtypes))}")
    c, inner = hidden_size, 2 * hidden_size
    expected = {"0.weight": (inner, c), "0.bias": (inner,), "3.weight": (1, inner), "3.bias": (1,)}
    for k, shape in expected.items():
        if raw[k].shape != shape:
            raise BadCheckpointError(
                f"SPRM head {k} has shape {list(raw[k].shape)}, expected {list(shape)} for hidden size {c}"
            )
    return SprmHeadWeights(
        fc1_weight=np.ascontiguousarray(raw["0.weight"]),
        fc1_bias=raw["0.bias"],
        fc2_weight=raw["3.weight"].reshape(inner),
        fc2_bias=raw["3.bias"],
    )


def read_tokenizer_facts(hf_dir: Path) -> TokenizerFacts:
    """Step delimiter ids (`.\\n\\n` tokenized) and the ids of <think> and </think> (-1 if absent)."""
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise BadCheckpointError(f"tokenizer.json not found in {hf_dir}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise BadCheckpointError(f"tokenizer.json cannot be loaded: {e}") from None
    step_ids = tuple(tok.encode(STEP_DELIMITER, add_special_tokens=False).ids)
    if not step_ids:
        raise BadCheckpointError("the tokenizer encodes the step delimiter '.\\n\\n' to nothing")
    start, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    return TokenizerFacts(
        step_token_ids=step_ids,
        think_start_id=-1 if start is None else start,
        think_end_id=-1 if end is None else end,
    )
