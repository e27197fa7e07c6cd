"""The onnxruntime session of an ONNX model directory, and its KV cache as numpy arrays.

Execution providers: CUDA when the installed onnxruntime has it (`edge-metastone[onnx-gpu]`) and
it starts, else the CPU. `EDGE_METASTONE_ONNX_PROVIDER=cpu` forces the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edge_metastone.errors import BadModelFileError, EdgeMetastoneError
from edge_metastone.limits import default_threads
from edge_metastone.onnx_backend.modeldir import OnnxModelDir

logger = logging.getLogger(__name__)

ort.set_default_logger_severity(3)  # errors only: warnings about unused initializers are noise


def providers_for(choice: str | None = None) -> list[str]:
    """The execution providers to ask for, best first."""
    choice = (choice or os.environ.get("EDGE_METASTONE_ONNX_PROVIDER", "auto")).lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise EdgeMetastoneError(
            f"EDGE_METASTONE_ONNX_PROVIDER must be auto, cpu or cuda (got {choice!r})"
        )
    available = ort.get_available_providers()
    if choice != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if choice == "cuda":
        raise EdgeMetastoneError(
            "the CUDA execution provider is not available: pip install 'edge-metastone[onnx-gpu]'"
        )
    return ["CPUExecutionProvider"]


@dataclass
class KVCache:
    """Keys and values of every layer, [B, n_kv, T, head_dim] float32 each."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @classmethod
    def empty(cls, md: OnnxModelDir, batch: int = 1) -> KVCache:
        """No tokens yet."""
        shape = (batch, md.n_kv_heads, 0, md.head_dim)
        z = np.zeros(shape, np.float32)
        return cls([z] * md.n_layers, [z] * md.n_layers)

    @property
    def length(self) -> int:
        """Cached positions."""
        return int(self.keys[0].shape[2])

    def repeat(self, k: int) -> KVCache:
        """One row copied to k rows (the shared prompt cache, prefilled once)."""
        return KVCache(
            [np.repeat(a, k, axis=0) for a in self.keys],
            [np.repeat(a, k, axis=0) for a in self.values],
        )

    def take(self, rows: Sequence[int]) -> KVCache:
        """Only `rows` (the candidates still running), in that order."""
        idx = np.asarray(rows, dtype=np.int64)
        return KVCache([a[idx] for a in self.keys], [a[idx] for a in self.values])


@dataclass
class Forward:
    """One run's outputs: logits of the kept positions, step logits and features of every
    position (when asked for), and the grown cache."""

    logits: np.ndarray  # [B, kept, V]
    sprm_logits: np.ndarray | None  # [B, S]
    features: np.ndarray | None  # [B, S, C]
    cache: KVCache


class Session:
    """One `onnxruntime.InferenceSession` over the directory's graph."""

    def __init__(self, md: OnnxModelDir, *, n_threads: int = 0, provider: str | None = None):
        self.md = md
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n_threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._s: ort.InferenceSession | None = ort.InferenceSession(
                str(md.model_file), sess_options=opts, providers=providers_for(provider)
            )
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise BadModelFileError(
                f"{md.model_file}: onnxruntime cannot load it: {_first(e)}"
            ) from None
        self.provider = self._s.get_providers()[0]
        self._check_signature()

    def _check_signature(self) -> None:
        """The graph must be the one metastone.json describes."""
        md = self.md
        ins = {i.name: i for i in self._s.get_inputs()}
        outs = {o.name: o for o in self._s.get_outputs()}
        want_in = {"input_ids", "logits_to_keep"}
        want_out = {"logits", "sprm_features"}
        for i in range(md.n_layers):
            want_in |= {f"past_key_values.{i}.key", f"past_key_values.{i}.value"}
            want_out |= {f"present.{i}.key", f"present.{i}.value"}
        if md.has_head:
            want_out.add("sprm_logits")
        missing = sorted((want_in - set(ins)) | (want_out - set(outs)))
        if missing or len(ins) != len(want_in):
            what = ", ".join(missing[:4]) if missing else "inputs beyond the model's"
            raise BadModelFileError(
                f"{md.path}: the graph does not match {md.n_layers} layers in metastone.json "
                f"({what})"
            )
        kv = ins["past_key_values.0.key"].shape
        v = outs["logits"].shape
        f = outs["sprm_features"].shape
        if (
            len(kv) != 4
            or kv[1] != md.n_kv_heads
            or kv[3] != md.head_dim
            or v[-1] != md.vocab_size
            or f[-1] != md.hidden_size
        ):
            raise BadModelFileError(
                f"{md.path}: the graph's shapes do not match metastone.json "
                "(KV heads, head size, vocabulary or hidden size)"
            )

    def forward(
        self,
        input_ids: np.ndarray,
        cache: KVCache,
        *,
        keep_logits: int = 1,
        sprm: bool = False,
        features: bool = False,
    ) -> Forward:
        """Run input_ids [B, S] after `cache`; logits of the last `keep_logits` positions."""
        n = self.md.n_layers
        feed: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "logits_to_keep": np.asarray([keep_logits], dtype=np.int64),
        }
        for i in range(n):
            feed[f"past_key_values.{i}.key"] = cache.keys[i]
            feed[f"past_key_values.{i}.value"] = cache.values[i]
        names = ["logits"]
        names += [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        if sprm:
            names.append("sprm_logits")
        if features:
            names.append("sprm_features")
        if self._s is None:
            raise EdgeMetastoneError("the ONNX model is closed")
        try:
            out = self._s.run(names, feed)
        except Exception as e:
            raise EdgeMetastoneError(f"onnxruntime failed to run the model: {_first(e)}") from None
        presents = out[1 : 1 + 2 * n]
        return Forward(
            logits=out[0],
            sprm_logits=out[1 + 2 * n] if sprm else None,
            features=out[-1] if features else None,
            cache=KVCache(presents[0::2], presents[1::2]),
        )

    def close(self) -> None:
        """Free the session."""
        self._s = None


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
