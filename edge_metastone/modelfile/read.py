"""Open and validate a model GGUF: its facts, its tensors, its SPRM head (metadata or sidecar)."""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_metastone import keys
from edge_metastone.errors import BadModelFileError
from edge_metastone.normalization import NORMAL_FORMS, NormalForm
from edge_metastone.sprm import SprmHead
from edge_metastone.types import PolicyKeys

logger = logging.getLogger(__name__)

# Decoder-only architectures whose llama.cpp graph names every layer's residual-stream output
# `l_out-{i}` (checked in llama.cpp's src/models/<arch>.cpp), so the SPRM features (layer L-2) can be
# captured in-stream. Mistral's GGUFs are written as `llama`.
SUPPORTED_ARCHS = ("qwen2", "qwen3", "llama", "gemma", "gemma2", "gemma3", "phi3")
# Tokenizer models llama.cpp's loaders accept for these: BPE (gpt2) and SentencePiece (llama)
SUPPORTED_TOKENIZERS = ("gpt2", "llama")
SIDECAR_SUFFIX = ".sprm.gguf"
_GGUF_MAGIC = b"GGUF"


class _FastReader(gguf.GGUFReader):
    """GGUFReader that maps a numeric metadata array as one numpy view and walks string arrays
    with struct instead of two numpy views per string.

    The stock reader builds numpy objects per array element: minutes and gigabytes for the SPRM
    head of a large model (2C^2 numbers), and ~3 s for a 152k-token vocabulary on every open.
    """

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[Any], list[int], list[Any]]:
        if gguf.GGUFValueType(raw_type) is gguf.GGUFValueType.ARRAY:
            raw_itype = self._get(orig_offs, np.uint32)
            itype = gguf.GGUFValueType(int(raw_itype[0]))
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                alen = self._get(orig_offs + 4, np.uint64)
                count = int(alen[0])
                values = self._get(orig_offs + 12, nptype, count)
                if len(values) != count:
                    raise ValueError("metadata array runs past the end of the file")
                size = 12 + int(values.nbytes)
                return size, [raw_itype, alen, values], [2], [gguf.GGUFValueType.ARRAY, itype]
            if itype is gguf.GGUFValueType.STRING and self.byte_order == "I":
                return self._string_array(orig_offs, raw_itype)
        return super()._get_field_parts(orig_offs, raw_type)

    def _string_array(
        self, orig_offs: int, raw_itype: np.ndarray
    ) -> tuple[int, list[Any], list[int], list[Any]]:
        alen = self._get(orig_offs + 4, np.uint64)
        count, offs = int(alen[0]), orig_offs + 12
        buf, end = memoryview(self.data), len(self.data)
        parts: list[Any] = [raw_itype, alen]
        for _ in range(count):
            if offs + 8 > end:
                raise ValueError("metadata string array runs past the end of the file")
            (n,) = struct.unpack_from("<Q", buf, offs)
            if offs + 8 + n > end:
                raise ValueError("metadata string runs past the end of the file")
            parts.append(self.data[offs + 8 : offs + 8 + n])
            offs += 8 + n
        types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
        return offs - orig_offs, parts, list(range(2, 2 + count)), types


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Parse a GGUF's header, metadata and tensor table, with one clear error for any damage."""
    path = Path(path)
    if not path.is_file():
        raise BadModelFileError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise BadModelFileError(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        reader = _FastReader(path)
    except (ValueError, IndexError, OverflowError, KeyError, UnicodeDecodeError, MemoryError) as e:
        raise BadModelFileError(f"{path}: truncated or corrupt GGUF ({e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise BadModelFileError(
                f"{path}: truncated GGUF (tensor {t.name} ends at byte {end}, file has {size})"
            )
    return reader


_V = gguf.GGUFValueType
_INT_TYPES = {_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64}
_FLOAT_TYPES = {_V.FLOAT32, _V.FLOAT64}
_MAX_DIM = 1 << 20
# rope scaling types llama.cpp knows (src/llama-hparams / LLAMA_ROPE_SCALING_TYPES); others abort
_ROPE_SCALING = ("none", "linear", "yarn", "longrope")


class _Meta:
    """Typed, validated reads of one file's metadata: every wrong type, count, range or encoding is
    a `BadModelFileError` naming the key (never a TypeError from deep inside)."""

    def __init__(self, reader: gguf.GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def bad(self, key: str, why: str) -> BadModelFileError:
        return BadModelFileError(f"{self.path}: metadata {key} {why}")

    def has(self, key: str) -> bool:
        return self.reader.get_field(key) is not None

    def _get(self, key: str, required: bool) -> gguf.ReaderField | None:
        f = self.reader.get_field(key)
        if f is None and required:
            raise BadModelFileError(f"{self.path}: missing metadata key {key}")
        return f

    def int(
        self, key: str, default: int | None = None, *, lo: int | None = None, hi: int | None = None
    ) -> int:
        f = self._get(key, default is None)
        if f is None:
            return default  # type: ignore[return-value]
        if len(f.types) != 1 or f.types[0] not in _INT_TYPES:
            raise self.bad(key, "must be an integer")
        v = int(f.parts[f.data[0]][0])
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.bad(key, f"is {v}, outside {lo}..{hi}")
        return v

    def float(self, key: str, default: float | None = None, *, positive: bool = True) -> float:
        f = self._get(key, default is None)
        if f is None:
            return default  # type: ignore[return-value]
        if len(f.types) != 1 or f.types[0] not in _FLOAT_TYPES | _INT_TYPES:
            raise self.bad(key, "must be a number")
        v = float(f.parts[f.data[0]][0])
        if not np.isfinite(v) or (positive and v <= 0):
            raise self.bad(key, f"is {v}, not a finite{' positive' if positive else ''} number")
        return v

    def str(self, key: str, default: str | None = None) -> str:
        f = self._get(key, default is None)
        if f is None:
            return default  # type: ignore[return-value]
        if f.types != [_V.STRING]:
            raise self.bad(key, "must be a string")
        try:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(key, "is not valid UTF-8") from None

    def array(self, key: str, kinds: set[gguf.GGUFValueType]) -> np.ndarray | None:
        """A numeric array of one of `kinds`, as one numpy view; None when absent."""
        f = self._get(key, False)
        if f is None:
            return None
        if len(f.types) != 2 or f.types[0] is not _V.ARRAY or f.types[1] not in kinds:
            raise self.bad(key, f"must be an array of {'/'.join(k.name for k in kinds)}")
        return np.asarray(f.parts[f.data[0]]) if f.data else np.empty(0)

    def strings(self, key: str) -> list[bytes] | None:
        f = self._get(key, False)
        if f is None:
            return None
        if f.types != [_V.ARRAY, _V.STRING]:
            raise self.bad(key, "must be an array of strings")
        return [bytes(f.parts[i]) for i in f.data]


def read_head(reader: gguf.GGUFReader, path: Path) -> SprmHead | None:
    """The SPRM head stored in `reader`'s metadata, or None when it has none."""
    m = _Meta(reader, path)
    if not m.has(keys.SPRM_VERSION):
        return None
    version = m.int(keys.SPRM_VERSION)
    if version != keys.SPRM_FORMAT_VERSION:
        raise BadModelFileError(f"{path}: SPRM head version {version} is not supported")
    dtype = m.str(keys.SPRM_DTYPE)
    if dtype not in ("f32", "f16"):
        raise BadModelFileError(f"{path}: SPRM head dtype {dtype!r} is not f32 or f16")
    c = m.int(keys.SPRM_HIDDEN_SIZE, lo=1, hi=1 << 16)
    inner = m.int(keys.SPRM_INNER_SIZE, lo=1, hi=1 << 17)
    if inner != 2 * c:
        raise BadModelFileError(f"{path}: SPRM inner size {inner} is not 2 x hidden size {c}")
    kind = _V.UINT16 if dtype == "f16" else _V.FLOAT32
    arrays = []
    for key, shape in zip(keys.SPRM_ARRAYS, ((inner, c), (inner,), (inner,), (1,)), strict=True):
        raw = m.array(key, {kind})
        if raw is None:
            raise BadModelFileError(f"{path}: missing metadata key {key}")
        if raw.size != int(np.prod(shape)):
            raise BadModelFileError(
                f"{path}: {key} has {raw.size} values, expected {int(np.prod(shape))}"
            )
        values = raw.view(np.float16) if dtype == "f16" else raw
        if not np.isfinite(values).all():
            raise BadModelFileError(f"{path}: {key} holds non-finite values")
        arrays.append(values.astype(np.float32).reshape(shape))  # widened once, at load
    return SprmHead(
        fc1_weight=arrays[0],
        fc1_bias=arrays[1],
        fc2_weight=arrays[2],
        fc2_bias=arrays[3],
        feature_layer=m.int(keys.SPRM_FEATURE_LAYER, lo=0, hi=4096),
        dtype=dtype,
    )


def _step_facts(m: _Meta, n_vocab: int) -> tuple[tuple[int, ...], int, int]:
    ids = m.array(keys.STEP_TOKEN_IDS, _INT_TYPES)
    step = tuple(int(x) for x in ids) if ids is not None else ()
    if any(not 0 <= t < n_vocab for t in step):
        raise m.bad(keys.STEP_TOKEN_IDS, f"holds ids outside the vocabulary of {n_vocab}")
    start = m.int(keys.THINK_START_ID, -1, lo=-1, hi=n_vocab - 1)
    end = m.int(keys.THINK_END_ID, -1, lo=-1, hi=n_vocab - 1)
    return step, start, end


@dataclass(frozen=True)
class ModelFile:
    """The facts of a validated model file (a GGUF of one of SUPPORTED_ARCHS) and its SPRM head,
    if any."""

    path: Path
    arch: str
    name: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_heads: int
    n_kv_heads: int
    n_vocab: int
    context_length: int
    file_type: int
    n_params: int
    n_bytes: int
    tensor_types: dict[str, int]
    head: SprmHead | None
    head_source: Path | None
    step_token_ids: tuple[int, ...]
    think_start_id: int
    think_end_id: int
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    # metastone.default_strategy, .adaptive, .selector, .thinking_scaling as the maker wrote them
    # (parsed and checked once, when a model opens: `model_records`)
    policy_keys: PolicyKeys = field(default_factory=PolicyKeys)
    normalizer: NormalForm | None = None  # metastone.tokenizer.normalizer
    # metastone.tokenizer.special_tokens: the tokenizer's named special tokens (None in older files)
    special_tokens: Mapping[str, str] | None = None
    key_length: int = 0  # `{arch}.attention.key_length` (Gemma: not n_embd / n_heads); 0: absent

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.key_length or self.n_embd // self.n_heads

    @property
    def has_head(self) -> bool:
        """True when step scoring is available."""
        return self.head is not None

    @property
    def template_variables(self) -> dict[str, str]:
        """The chat template's token variables: the tokenizer's own named special tokens, as
        transformers passes them (those it leaves undefined stay undefined); in files made before
        the key, the texts of the BOS and EOS ids."""
        if self.special_tokens is not None:
            return dict(self.special_tokens)
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}


def sidecar_path(model_path: Path) -> Path:
    """Where a head-only GGUF for `model_path` lives by convention (`NAME.sprm.gguf`)."""
    return model_path.with_name(model_path.name.removesuffix(".gguf") + SIDECAR_SUFFIX)


def open_model_file(path: Path | str, head_path: Path | str | None = None) -> ModelFile:
    """Validate `path` and read its facts; the head comes from its metadata, `head_path`, or the
    sidecar. Anything llama.cpp would abort on (rather than refuse) is refused here first."""
    path = Path(path)
    reader = read_gguf(path)
    try:
        return _open(path, reader, head_path)
    except BadModelFileError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise BadModelFileError(f"{path}: malformed metadata ({type(e).__name__}: {e})") from None


def _open(path: Path, reader: gguf.GGUFReader, head_path: Path | str | None) -> ModelFile:
    """`open_model_file`'s body: every check, in order, then the facts."""
    m = _Meta(reader, path)
    arch = _check_arch(m)
    n_embd, n_layers, n_heads, n_kv_heads, key_length = _check_hparams(m, arch)
    tokens = _check_vocabulary(m)
    n_vocab = len(tokens)
    _check_tensors(path, reader)
    head, head_source, facts = _load_head(m, head_path)
    step_ids, think_start, think_end = _step_facts(facts, n_vocab)
    if head is not None:
        _check_head_fits(head, head_source, n_embd, n_layers, step_ids)
    special, bos, eos = _bos_eos(m, tokens)
    normalizer = m.str(keys.TOKENIZER_NORMALIZER, "") or None
    if normalizer is not None and normalizer not in NORMAL_FORMS:
        raise m.bad(keys.TOKENIZER_NORMALIZER, f"is {normalizer!r}, not one of {NORMAL_FORMS}")
    template = m.str(gguf.Keys.Tokenizer.CHAT_TEMPLATE, "") or None
    # a sidecar head's own measured choice first: the model file's was measured with its head
    strategy = _recorded(facts, keys.DEFAULT_STRATEGY) or _recorded(m, keys.DEFAULT_STRATEGY)
    adaptive = _recorded(m, keys.ADAPTIVE)
    llm = gguf.Keys.LLM
    return ModelFile(
        path=path,
        arch=arch,
        name=m.str(gguf.Keys.General.NAME, "") or path.stem,
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=_hparam(m, arch, llm.FEED_FORWARD_LENGTH),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_vocab=n_vocab,
        context_length=_hparam(m, arch, llm.CONTEXT_LENGTH, 1 << 24),
        file_type=m.int(gguf.Keys.General.FILE_TYPE, -1),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        head=head,
        head_source=head_source,
        step_token_ids=step_ids,
        think_start_id=think_start,
        think_end_id=think_end,
        chat_template=template,
        bos_token=bos,
        eos_token=eos,
        policy_keys=PolicyKeys(
            default_strategy=strategy or None,
            adaptive=adaptive or None,
            selector=_recorded(facts, keys.SELECTOR) or None,
            thinking_scaling=_recorded(m, keys.THINKING_SCALING) or None,
        ),
        normalizer=normalizer,  # type: ignore[arg-type]
        special_tokens=special,
        key_length=key_length,
    )


def _check_arch(m: _Meta) -> str:
    """The file's architecture, one this build runs, in a file with tensors."""
    arch = m.str(gguf.Keys.General.ARCHITECTURE)
    if arch not in SUPPORTED_ARCHS:
        raise BadModelFileError(
            f"{m.path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if not m.reader.tensors:
        raise BadModelFileError(f"{m.path}: the file has no tensors (a head-only sidecar?)")
    return arch


def _hparam(m: _Meta, arch: str, key: str, hi: int = _MAX_DIM) -> int:
    """A positive `{arch}.` size of at most `hi`."""
    return m.int(key.format(arch=arch), lo=1, hi=hi)


def _check_hparams(m: _Meta, arch: str) -> tuple[int, int, int, int, int]:
    """Hidden size, layers, heads, KV heads (checked to divide) and the head size when the file
    states it (0 if not), with the norm and rope settings llama.cpp would abort on checked too."""
    llm, att, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    n_embd = _hparam(m, arch, llm.EMBEDDING_LENGTH, 1 << 16)
    n_layers = _hparam(m, arch, llm.BLOCK_COUNT, 4096)
    n_heads = _hparam(m, arch, att.HEAD_COUNT, 4096)
    n_kv_heads = _hparam(m, arch, att.HEAD_COUNT_KV, 4096)
    key_length = m.int(att.KEY_LENGTH.format(arch=arch), 0, lo=1, hi=1 << 16)
    if (not key_length and n_embd % n_heads) or n_heads % n_kv_heads:
        raise BadModelFileError(
            f"{m.path}: {n_heads} heads / {n_kv_heads} KV heads do not divide hidden size {n_embd}"
        )
    m.float(att.LAYERNORM_RMS_EPS.format(arch=arch))
    m.float(rope.FREQ_BASE.format(arch=arch), 10000.0)
    rope_type = m.str(rope.SCALING_TYPE.format(arch=arch), "none")
    if rope_type not in _ROPE_SCALING:
        raise BadModelFileError(f"{m.path}: rope scaling type {rope_type!r} is not supported")
    m.float(rope.SCALING_FACTOR.format(arch=arch), 1.0)
    return n_embd, n_layers, n_heads, n_kv_heads, key_length


def _load_head(
    m: _Meta, head_path: Path | str | None
) -> tuple[SprmHead | None, Path | None, _Meta]:
    """The head (from the metadata, `head_path` or the sidecar), the file it came from (None
    without a head), and that file's metadata, which holds the step facts."""
    path = m.path
    head, head_source, facts = read_head(m.reader, path), path, m
    if head_path is None and head is None and sidecar_path(path).is_file():
        head_path = sidecar_path(path)
    if head_path is not None:
        head_path = Path(head_path)
        side = read_gguf(head_path)
        try:
            head, head_source, facts = read_head(side, head_path), head_path, _Meta(side, head_path)
        except (ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise BadModelFileError(f"{head_path}: malformed metadata ({e})") from None
        if head is None:
            raise BadModelFileError(f"{head_path}: no SPRM head in this file")
    if head is None:
        head_source = None
    return head, head_source, facts


def _check_head_fits(
    head: SprmHead,
    head_source: Path | None,
    n_embd: int,
    n_layers: int,
    step_ids: tuple[int, ...],
) -> None:
    """The head reads this model's stream at one of its layers, and steps can be found."""
    if head.hidden_size != n_embd:
        raise BadModelFileError(
            f"{head_source}: SPRM head hidden size {head.hidden_size} != model's {n_embd}"
        )
    if not 0 <= head.feature_layer < n_layers:
        raise BadModelFileError(
            f"{head_source}: SPRM feature layer {head.feature_layer} outside 0..{n_layers - 1}"
        )
    if not step_ids:
        raise BadModelFileError(
            f"{head_source}: an SPRM head without {keys.STEP_TOKEN_IDS}: no step could be scored"
        )


def _bos_eos(m: _Meta, tokens: list[bytes]) -> tuple[dict[str, str] | None, str, str]:
    """The named special tokens (None in older files) and the BOS and EOS texts."""
    special = _special_tokens(m)
    if special is not None:
        return special, special.get("bos_token", ""), special.get("eos_token", "")

    def token_text(key: str) -> str:
        tid = m.int(key, -1, lo=-1)
        return tokens[tid].decode("utf-8", "replace") if 0 <= tid < len(tokens) else ""

    # a file made before the key: BOS and EOS from the ids, as before
    return None, token_text(gguf.Keys.Tokenizer.BOS_ID), token_text(gguf.Keys.Tokenizer.EOS_ID)


SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_MAX_SPECIAL_TOKEN_CHARS = 1024


def _special_tokens(m: _Meta) -> dict[str, str] | None:
    """metastone.tokenizer.special_tokens: a JSON object from SPECIAL_TOKEN_NAMES to short strings."""
    key = keys.TOKENIZER_SPECIAL_TOKENS
    if not m.has(key):
        return None
    try:
        value = json.loads(m.str(key))
    except ValueError:
        raise m.bad(key, "is not valid JSON") from None
    problem = special_tokens_problem(value)
    if problem is not None:
        raise m.bad(key, problem)
    return value


def special_tokens_problem(value: object) -> str | None:
    """What is wrong with a named-special-tokens object (None: nothing); shared with ONNX dirs."""
    if not isinstance(value, dict):
        return "must be a JSON object"
    for name, text in value.items():
        if name not in SPECIAL_TOKEN_NAMES:
            return f"names {name!r}, not one of {', '.join(SPECIAL_TOKEN_NAMES)}"
        if not isinstance(text, str) or len(text) > _MAX_SPECIAL_TOKEN_CHARS:
            return f"gives {name} a value that is not a string of at most 1024 characters"
    return None


def _is_string(m: _Meta, key: str) -> bool:
    f = m.reader.get_field(key)
    return f is not None and f.types == [_V.STRING]


def _recorded(m: _Meta, key: str) -> str:
    """An optional string key a maker recorded ("" when absent or not a string)."""
    return m.str(key, "") if _is_string(m, key) else ""


_BYTE_TOKENS = frozenset(f"<0x{b:02X}>".encode() for b in range(256))


def _check_vocabulary(m: _Meta) -> list[bytes]:
    """A BPE or SentencePiece vocabulary llama.cpp's loader accepts; returns its tokens (read
    once)."""
    tk = gguf.Keys.Tokenizer
    model = m.str(tk.MODEL)
    if model not in SUPPORTED_TOKENIZERS:
        raise m.bad(tk.MODEL, f"is {model!r}, not one of {', '.join(SUPPORTED_TOKENIZERS)}")
    tokens = m.strings(tk.LIST)
    if not tokens:
        raise BadModelFileError(f"{m.path}: the file has no vocabulary ({tk.LIST})")
    n = len(tokens)
    unique = set(tokens)
    if len(unique) != n:
        raise m.bad(tk.LIST, "holds duplicate tokens")
    if model == "llama" and not _BYTE_TOKENS.issubset(unique):
        # llama.cpp's SentencePiece tokenizer throws (an abort, through the C API) on a byte it
        # has no <0xXX> token for
        raise m.bad(tk.LIST, "is a SentencePiece vocabulary without its 256 byte tokens")
    for key, kinds in ((tk.TOKEN_TYPE, _INT_TYPES), (tk.SCORES, _FLOAT_TYPES)):
        arr = m.array(key, kinds)
        if arr is not None and len(arr) != n:
            raise m.bad(key, f"has {len(arr)} entries for {n} tokens")
    m.strings(tk.MERGES)
    for key in (tk.BOS_ID, tk.EOS_ID, tk.EOT_ID, tk.PAD_ID, tk.UNK_ID, tk.SEP_ID):
        m.int(key, -1, lo=-1, hi=n - 1)
    return tokens


def _check_tensors(path: Path, reader: gguf.GGUFReader) -> None:
    """One-dimensional tensors (norms, biases) must be F32: llama.cpp aborts on quantized ones."""
    for t in reader.tensors:
        dims = [int(d) for d in t.shape if int(d) != 1] or [1]
        if len(dims) == 1 and t.tensor_type is not gguf.GGMLQuantizationType.F32:
            raise BadModelFileError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}; 1-D tensors must be F32"
            )
        if any(int(d) < 1 or int(d) > (1 << 32) for d in t.shape):
            raise BadModelFileError(f"{path}: tensor {t.name} has shape {list(t.shape)}")
