"""An ONNX model directory's metadata (`metastone.json`) and tokenizer, read and validated.

Both come from strangers: every field is type- and range-checked, and each problem is one
`BadModelFileError` line (never a traceback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_metastone import keys
from edge_metastone.errors import BadModelFileError
from edge_metastone.modelfile.read import special_tokens_problem
from edge_metastone.normalization import NORMAL_FORMS
from edge_metastone.types import PolicyKeys

MODEL_FILE = "model.onnx"
META_FILE = "metastone.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "edge-metastone-onnx"
FORMAT_VERSION = 1
MAX_META_BYTES = 16 << 20
MAX_DIM = 1 << 20  # hidden size, vocabulary and context bounds well above any real model


@dataclass(frozen=True)
class OnnxModelDir:
    """The facts of an ONNX model directory."""

    path: Path
    out_type: str
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    step_token_ids: tuple[int, ...]
    think_start_id: int
    think_end_id: int
    eog_token_ids: tuple[int, ...]
    bos_token: str
    eos_token: str
    chat_template: str | None
    has_head: bool
    feature_layer: int
    n_bytes: int
    special_tokens: dict[str, str] | None = None  # the tokenizer's named special tokens
    normalizer: str | None = None  # the tokenizer's Unicode normal form (stop strings get it)
    policy_keys: PolicyKeys = field(default_factory=PolicyKeys)  # as exported from the GGUF

    @property
    def template_variables(self) -> dict[str, str]:
        """The chat template's token variables, as `ModelFile.template_variables`."""
        if self.special_tokens is not None:
            return dict(self.special_tokens)
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.n_heads

    @property
    def model_file(self) -> Path:
        """The graph."""
        return self.path / MODEL_FILE


def _int(meta: dict[str, Any], key: str, lo: int, hi: int, where: Path) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadModelFileError(f"{where}: {key} must be an integer in [{lo}, {hi}] (got {v!r})")
    return v


def _str(meta: dict[str, Any], key: str, where: Path, *, optional: bool = True) -> str | None:
    v = meta.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise BadModelFileError(f"{where}: {key} must be a string")
    return v


def _ids(meta: dict[str, Any], key: str, vocab: int, where: Path) -> tuple[int, ...]:
    v = meta.get(key)
    if not isinstance(v, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in v
    ):
        raise BadModelFileError(f"{where}: {key} must be a list of token ids below {vocab}")
    return tuple(v)


def _load_meta(path: Path) -> tuple[dict[str, Any], Path]:
    """`path/metastone.json` as a JSON object of this format and version, and its path."""
    where = path / META_FILE
    try:
        if where.stat().st_size > MAX_META_BYTES:
            raise BadModelFileError(f"{where} is larger than {MAX_META_BYTES >> 20} MiB")
        meta = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadModelFileError(
            f"{path} has no {META_FILE}: not an edge-metastone ONNX model"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadModelFileError(f"{where} cannot be read as JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BadModelFileError(f"{where} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise BadModelFileError(f"{where}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BadModelFileError(
            f"{where}: format_version {meta.get('format_version')!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    return meta, where


def _sizes(meta: dict[str, Any], where: Path) -> tuple[int, int, int, int]:
    """Hidden size, layers, heads and KV heads, checked to divide."""
    c = _int(meta, "hidden_size", 1, MAX_DIM, where)
    n_layers = _int(meta, "n_layers", 2, 4096, where)
    n_heads = _int(meta, "n_heads", 1, 4096, where)
    n_kv = _int(meta, "n_kv_heads", 1, n_heads, where)
    if c % n_heads or n_heads % n_kv:
        raise BadModelFileError(
            f"{where}: hidden_size {c}, n_heads {n_heads} and n_kv_heads {n_kv} do not divide"
        )
    return c, n_layers, n_heads, n_kv


def _head(meta: dict[str, Any], where: Path, c: int, n_layers: int) -> tuple[bool, int]:
    """Whether the graph has the SPRM head, and its feature layer (L-2 without one)."""
    has_head = keys.SPRM_VERSION in meta
    feature_layer = n_layers - 2
    if has_head:
        if meta[keys.SPRM_VERSION] != keys.SPRM_FORMAT_VERSION:
            raise BadModelFileError(f"{where}: {keys.SPRM_VERSION} must be 1")
        feature_layer = _int(meta, keys.SPRM_FEATURE_LAYER, 0, n_layers - 1, where)
        if _int(meta, keys.SPRM_HIDDEN_SIZE, 1, MAX_DIM, where) != c:
            raise BadModelFileError(f"{where}: the SPRM head's hidden size is not the model's")
        if _int(meta, keys.SPRM_INNER_SIZE, 1, 2 * MAX_DIM, where) != 2 * c:
            raise BadModelFileError(f"{where}: the SPRM head's inner size is not 2C")
    return has_head, feature_layer


def _dir_bytes(path: Path) -> int:
    """Total size of the directory's files."""
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError as e:
        raise BadModelFileError(f"cannot read {path}: {e}") from None


def read_model_dir(path: Path) -> OnnxModelDir:
    """Read and check `path/metastone.json` (the SPEC §2 keys under their GGUF names)."""
    meta, where = _load_meta(path)
    out_type = _str(meta, "out_type", where) or "unknown"
    c, n_layers, n_heads, n_kv = _sizes(meta, where)
    vocab = _int(meta, "vocab_size", 1, 1 << 24, where)
    step_ids = _ids(meta, keys.STEP_TOKEN_IDS, vocab, where)
    if not step_ids:
        raise BadModelFileError(f"{where}: {keys.STEP_TOKEN_IDS} is empty")
    has_head, feature_layer = _head(meta, where, c, n_layers)
    template = _str(meta, "chat_template", where)
    strategy = _str(meta, keys.DEFAULT_STRATEGY, where)
    n_bytes = _dir_bytes(path)
    return OnnxModelDir(
        path=path,
        out_type=out_type,
        hidden_size=c,
        intermediate_size=_int(meta, "intermediate_size", 1, 16 * MAX_DIM, where),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        context_length=_int(meta, "context_length", 1, 1 << 24, where),
        step_token_ids=step_ids,
        think_start_id=_int(meta, keys.THINK_START_ID, -1, vocab - 1, where),
        think_end_id=_int(meta, keys.THINK_END_ID, -1, vocab - 1, where),
        eog_token_ids=_ids(meta, "eog_token_ids", vocab, where),
        bos_token=_str(meta, "bos_token", where) or "",
        eos_token=_str(meta, "eos_token", where) or "",
        chat_template=template,
        has_head=has_head,
        feature_layer=feature_layer,
        n_bytes=n_bytes,
        special_tokens=_special_tokens(meta, where),
        normalizer=_normalizer(meta, where),
        policy_keys=PolicyKeys(
            default_strategy=strategy,
            adaptive=_str(meta, keys.ADAPTIVE, where),
            selector=_str(meta, keys.SELECTOR, where),
            thinking_scaling=_str(meta, keys.THINKING_SCALING, where),
        ),
    )


def _special_tokens(meta: dict[str, Any], where: str) -> dict[str, str] | None:
    value = meta.get(keys.TOKENIZER_SPECIAL_TOKENS)
    if value is None:
        return None
    problem = special_tokens_problem(value)
    if problem is not None:
        raise BadModelFileError(f"{where}: {keys.TOKENIZER_SPECIAL_TOKENS} {problem}")
    return value


def _normalizer(meta: dict[str, Any], where: str) -> str | None:
    value = meta.get(keys.TOKENIZER_NORMALIZER)
    if value is not None and value not in NORMAL_FORMS:
        raise BadModelFileError(f"{where}: {keys.TOKENIZER_NORMALIZER} {value!r} is not supported")
    return value


# GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest are shifted to 256+.
def _byte_decoder() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class HfTokenizer:
    """The directory's `tokenizer.json` through HF `tokenizers` (no transformers), with the
    byte pieces llama.cpp would stream for each id."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        from tokenizers import Tokenizer

        file = path / TOKENIZER_FILE
        try:
            self._tok = Tokenizer.from_file(str(file))
            spec = json.loads(file.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises its own Exception subclass for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadModelFileError(f"{file} cannot be loaded: {first}") from None
        model = spec.get("model") if isinstance(spec, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict):
            raise BadModelFileError(f"{file}: only byte-level BPE tokenizers are supported")
        decoder = _byte_decoder()
        pieces: list[bytes] = [b""] * vocab_size  # ids the tokenizer lacks render as nothing
        for text, i in vocab.items():
            if isinstance(i, int) and 0 <= i < vocab_size and isinstance(text, str):
                pieces[i] = bytes(decoder.get(ch, ord("?")) for ch in text if ch in decoder)
        added: list[str] = []
        for a in spec.get("added_tokens") or []:
            i, text = a.get("id"), a.get("content")
            if isinstance(i, int) and 0 <= i < vocab_size and isinstance(text, str) and text:
                pieces[i] = text.encode("utf-8")
                added.append(text)
        self.pieces = pieces
        # spellings that parse as added tokens, longest first (kept as text in user messages)
        self.control_texts = tuple(sorted(set(added), key=len, reverse=True))

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Text -> ids; added-token spellings in `text` become those tokens; with `add_special`,
        the tokenizer's post-processor adds its own specials (a BOS, where it has one)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            from edge_metastone.errors import InvalidRequestError

            raise InvalidRequestError(
                f"the text is not valid Unicode ({e.reason} at character {e.start})"
            ) from None
        return list(self._tok.encode(text, add_special_tokens=add_special).ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (control tokens spelled out)."""
        return self.pieces[token] if 0 <= token < len(self.pieces) else b""

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, as llama.cpp's detokenizer with special tokens rendered."""
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")
