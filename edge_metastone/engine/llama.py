"""Owners of llama.cpp's native handles (model, context, batch): each has `close()` and is a context manager."""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from edge_metastone.chat import dedupe_bos
from edge_metastone.engine.weights.decision import WeightPlan
from edge_metastone.engine.weights.plan import plan_for
from edge_metastone.errors import (
    BadModelFileError,
    ContextExceededError,
    EdgeMetastoneError,
    InvalidRequestError,
)
from edge_metastone.keys import TOKENIZER_NORMALIZER
from edge_metastone.limits import MAX_THREADS, PREFILL_BATCH, default_threads
from edge_metastone.normalization import NORMAL_FORMS, NormalForm, normalize
from edge_metastone.types import WeightBuffers

logger = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line
_LOG_LEVELS = {2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_llama_logger = logging.getLogger("llama_cpp.native")


@llama_cpp.llama_log_callback
def _log_to_logging(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    msg = text.decode("utf-8", errors="replace").rstrip("\n")
    if msg:
        _llama_logger.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", msg)


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and route its log through `logging`."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_to_logging, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def prompt_ids(model: Model, text: str) -> list[int]:
    """A raw prompt's ids as llama.cpp's completion makes them (markup parsed, the BOS/EOS the
    file asks for), a BOS the text starts with not doubled (llama.cpp would)."""
    ids = model.tokenize(text, add_special=True)
    return dedupe_bos(ids, model.bos_id if model.add_bos else None)


class Model:
    """A loaded llama.cpp model and its vocabulary."""

    def __init__(
        self,
        path: Path | str,
        *,
        n_gpu_layers: int = 0,
        weight_buffers: WeightBuffers | str | None = None,
        vocab_only: bool = False,  # the tokenizer alone (no weights): what the vocabulary says
    ) -> None:
        ensure_backend()
        self.path = Path(path)
        self._ptr = None
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        # where the weights live (AMX-safe by default): `weight_buffers`, env, or auto
        placement = plan_for(self.path, weight_buffers, gpu_layers=n_gpu_layers)
        placement.apply(params)
        params.vocab_only = vocab_only
        self.weight_plan: WeightPlan = placement.plan
        self._ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise BadModelFileError(f"{self.path}: llama.cpp could not load this model file")
        self.vocab = llama_cpp.llama_model_get_vocab(self._ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        if not vocab_only:  # llama.cpp aborts on a vocabulary-only model's hyperparameters
            self.n_embd = llama_cpp.llama_model_n_embd(self._ptr)
            self.n_layer = llama_cpp.llama_model_n_layer(self._ptr)
            self.n_heads = llama_cpp.llama_model_n_head(self._ptr)
            self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._ptr)
        self.eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self.eot_id = llama_cpp.llama_vocab_eot(self.vocab)
        self.bos_id = llama_cpp.llama_vocab_bos(self.vocab)
        # add_bos_token / add_eos_token (or llama.cpp's default): what a completion prompt gets
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)) and self.bos_id >= 0
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(self.vocab)) and self.eos_id >= 0
        self.normalizer: NormalForm | None = self._normalizer()

    def _normalizer(self) -> NormalForm | None:
        """The tokenizer's normal form recorded by the converter (None in files without one)."""
        value = self.meta_str(TOKENIZER_NORMALIZER)
        if value is not None and value not in NORMAL_FORMS:
            raise BadModelFileError(
                f"{self.path}: {TOKENIZER_NORMALIZER} {value!r} is not supported"
            )
        return value  # type: ignore[return-value]

    def meta_str(self, key: str) -> str | None:
        """One metadata value of the file as llama.cpp read it (None when absent)."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.raw[:n].decode("utf-8", errors="replace")

    @property
    def ptr(self) -> Any:
        """The raw llama_model pointer (for engine internals only)."""
        if not self._ptr:
            raise EdgeMetastoneError("model is closed")
        return self._ptr

    def tokenize(
        self, text: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int]:
        """Text -> token ids with the model's own tokenizer, the text first normalized as the
        tokenizer's own normalizer does (llama.cpp does not); added-token spellings stay as they are."""
        if self.normalizer is not None:
            text = normalize(text, self.normalizer, self.control_texts)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"the text is not valid Unicode ({e.reason} at character {e.start})"
            ) from None
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buf, cap, add_special, parse_special
        )
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, cap, add_special, parse_special
            )
        if n < 0:
            raise EdgeMetastoneError("tokenization failed")
        return list(buf[:n])

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def control_texts(self) -> tuple[str, ...]:
        """Texts that parse as control or added tokens (`<|im_end|>`, `<think>`, ...): one pass
        over the vocabulary, then cached."""
        mask = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        out = set()
        for t in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self.vocab, t) & mask:
                text = self.token_to_bytes(t).decode("utf-8", errors="replace")
                if text:
                    out.add(text)
        return tuple(sorted(out, key=len, reverse=True))

    @functools.cached_property
    def eog_ids(self) -> tuple[int, ...]:
        """Every end-of-generation token id (one pass over the vocabulary, then cached)."""
        return tuple(t for t in range(self.n_vocab) if self.is_eog(t))

    def token_to_bytes(self, token: int, *, special: bool = True) -> bytes:
        """The bytes one token stands for (special tokens rendered when `special`)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """Token ids -> text."""
        return b"".join(self.token_to_bytes(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace"
        )

    def close(self) -> None:
        """Free the model."""
        if self._ptr:
            llama_cpp.llama_model_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


@dataclass(frozen=True)
class ContextSettings:
    """How a llama.cpp context is made. `parity` selects flash attention off and an F32 KV cache."""

    n_ctx: int
    n_batch: int = PREFILL_BATCH
    n_seq_max: int = 1
    n_threads: int = 0  # 0: default_threads()
    parity: bool = False
    kv_unified: bool = True  # False: one KV stream per sequence (n_ctx is split among them)
    kv_type: str = "f16"  # f16, q8_0 or q4_0 (parity mode is F32)
    flash_attn: bool = True  # False: plain attention (an F16 cache only; parity mode never)

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.n_batch < 1 or self.n_seq_max < 1:
            raise ValueError("n_ctx, n_batch and n_seq_max must be positive")
        if not 0 <= self.n_threads <= MAX_THREADS:
            raise InvalidRequestError(f"threads must be between 0 (automatic) and {MAX_THREADS}")
        if self.kv_type not in _KV_TYPES:
            raise InvalidRequestError(f"unknown KV cache type {self.kv_type!r}")
        if self.parity and self.kv_type != "f16":
            raise InvalidRequestError("parity mode keeps the KV cache in F32: no kv_type with it")
        if not self.flash_attn and self.kv_type != "f16":
            raise InvalidRequestError("a quantized KV cache needs flash attention")


class Context:
    """A llama.cpp context over a `Model`, with an optional graph-evaluation callback."""

    def __init__(
        self,
        model: Model,
        settings: ContextSettings,
        *,
        cb_eval: Any = None,
        cb_user_data: int | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = settings.n_ctx
        p.n_batch = settings.n_batch
        p.n_ubatch = settings.n_batch
        p.n_seq_max = settings.n_seq_max
        threads = settings.n_threads or default_threads()
        p.n_threads = p.n_threads_batch = threads
        # unified: one KV buffer, one ubatch per decode. Streams: llama.cpp splits a decode into
        # ubatches of consecutive sequence ids (split_equal), so captured rows follow batch order
        # only while the batch lists its sequences in increasing id order (the engine does).
        p.kv_unified = settings.kv_unified
        p.no_perf = True
        if settings.parity:
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            p.type_k = p.type_v = llama_cpp.GGML_TYPE_F32
        elif not settings.flash_attn:
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        elif settings.kv_type != "f16":
            p.type_k = p.type_v = _KV_TYPES[settings.kv_type]
            p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V needs it
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = cb_user_data
        self._cb_eval = cb_eval  # keep the ctypes callback alive as long as the context
        self._ptr = llama_cpp.llama_init_from_model(model.ptr, p)
        if not self._ptr:
            raise EdgeMetastoneError(
                f"llama.cpp could not create a context of {settings.n_ctx} tokens"
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self._ptr)
        self.memory = llama_cpp.llama_get_memory(self._ptr)

    @property
    def ptr(self) -> Any:
        """The raw llama_context pointer (for engine internals only)."""
        if not self._ptr:
            raise EdgeMetastoneError("context is closed")
        return self._ptr

    def decode(self, batch: Batch) -> None:
        """Run one batch through the model."""
        rc = llama_cpp.llama_decode(self.ptr, batch.raw)
        if rc == 1:
            raise ContextExceededError("no room left in the KV cache for this batch")
        if rc != 0:
            raise EdgeMetastoneError(f"llama_decode failed with code {rc}")

    def prefill(
        self, batch: Batch, tokens: Sequence[int], *, all_logits: bool = False
    ) -> Iterator[tuple[int, int]]:
        """Decode `tokens` in sequence 0, one batch-sized chunk at a time; after each decode yield
        (position of its first token, its length). Logits: the last token's, or every token's."""
        n = len(tokens)
        for start in range(0, n, batch.capacity):
            batch.clear()
            chunk = tokens[start : start + batch.capacity]
            for i, tok in enumerate(chunk):
                batch.add(tok, start + i, (0,), all_logits or start + i == n - 1)
            self.decode(batch)
            yield start, len(chunk)

    def logits(self, i: int) -> np.ndarray:
        """Logits of output row `i` of the last decode, as a copy [n_vocab]."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def clear(self) -> None:
        """Forget every sequence in the KV cache."""
        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        """Free the context."""
        if self._ptr:
            llama_cpp.llama_free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Batch:
    """A llama_batch of up to `capacity` tokens, each in one or more sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)
        self.n_seq_max = n_seq_max
        self.raw.n_tokens = 0

    def clear(self) -> None:
        """Empty the batch."""
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq_ids: Sequence[int], logits: bool) -> int:
        """Append one token; returns its row index in the batch."""
        i = self.raw.n_tokens
        if i >= self.capacity:
            raise EdgeMetastoneError("batch is full")
        self.raw.token[i] = token
        self.raw.pos[i] = pos
        self.raw.n_seq_id[i] = len(seq_ids)
        for k, s in enumerate(seq_ids):
            self.raw.seq_id[i][k] = s
        self.raw.logits[i] = logits
        self.raw.n_tokens = i + 1
        return i

    def __len__(self) -> int:
        return self.raw.n_tokens

    def close(self) -> None:
        """Free the batch."""
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
