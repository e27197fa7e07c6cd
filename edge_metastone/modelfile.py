"""Open and validate a model GGUF: its facts, its tensors, its SPRM head (metadata or sidecar)."""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_metastone import keys
from edge_metastone.errors import BadModelFileError, EdgeMetastoneError
from edge_metastone.gguf_io import ArrayGGUFWriter, add_head_keys, add_step_keys, atomic_output
from edge_metastone.sprm import SprmHead, StepRule

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("qwen2",)
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


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    if (
        f.types
        and f.types[0] is gguf.GGUFValueType.ARRAY
        and f.types[-1] is not gguf.GGUFValueType.STRING
    ):
        return f.parts[f.data[0]] if len(f.data) == 1 else np.array(f.contents())
    return f.contents()


def _int_or(reader: gguf.GGUFReader, key: str, default: int) -> int:
    v = _field(reader, key)
    return default if v is None else int(v)


def _require(reader: gguf.GGUFReader, key: str, path: Path) -> Any:
    v = _field(reader, key)
    if v is None:
        raise BadModelFileError(f"{path}: missing metadata key {key}")
    return v


def read_head(reader: gguf.GGUFReader, path: Path) -> SprmHead | None:
    """The SPRM head stored in `reader`'s metadata, or None when it has none."""
    if reader.get_field(keys.SPRM_VERSION) is None:
        return None
    version = int(_require(reader, keys.SPRM_VERSION, path))
    if version != keys.SPRM_FORMAT_VERSION:
        raise BadModelFileError(f"{path}: SPRM head version {version} is not supported")
    dtype = str(_require(reader, keys.SPRM_DTYPE, path))
    c = int(_require(reader, keys.SPRM_HIDDEN_SIZE, path))
    inner = int(_require(reader, keys.SPRM_INNER_SIZE, path))
    arrays = []
    for key, shape in zip(keys.SPRM_ARRAYS, ((inner, c), (inner,), (inner,), (1,)), strict=True):
        raw = np.asarray(_require(reader, key, path))
        if dtype == "f16":
            raw = raw.astype(np.uint16, copy=False).view(np.float16)
        elif dtype != "f32":
            raise BadModelFileError(f"{path}: SPRM head dtype {dtype!r} is not f32 or f16")
        if raw.size != int(np.prod(shape)):
            raise BadModelFileError(
                f"{path}: {key} has {raw.size} values, expected {int(np.prod(shape))}"
            )
        arrays.append(raw.reshape(shape))
    return SprmHead(
        fc1_weight=arrays[0],
        fc1_bias=arrays[1],
        fc2_weight=arrays[2],
        fc2_bias=arrays[3],
        feature_layer=int(_require(reader, keys.SPRM_FEATURE_LAYER, path)),
        dtype=dtype,
    )


@dataclass(frozen=True)
class ModelFile:
    """The facts of a validated model file (a qwen2 GGUF) and its SPRM head, if any."""

    path: Path
    arch: str
    name: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
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
    default_strategy: str | None = None  # metastone.default_strategy, as written by the maker

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.n_embd // self.n_head

    @property
    def has_head(self) -> bool:
        """True when step scoring is available."""
        return self.head is not None


def sidecar_path(model_path: Path) -> Path:
    """Where a head-only GGUF for `model_path` lives by convention (`NAME.sprm.gguf`)."""
    return model_path.with_name(model_path.name.removesuffix(".gguf") + SIDECAR_SUFFIX)


def open_model_file(path: Path | str, head_path: Path | str | None = None) -> ModelFile:
    """Validate `path` and read its facts; the head comes from its metadata, `head_path`, or the sidecar."""
    path = Path(path)
    reader = read_gguf(path)
    arch = str(_require(reader, "general.architecture", path))
    if arch not in SUPPORTED_ARCHS:
        raise BadModelFileError(
            f"{path}: architecture {arch!r} is not supported (expected {', '.join(SUPPORTED_ARCHS)})"
        )
    if not reader.tensors:
        raise BadModelFileError(f"{path}: the file has no tensors (a head-only sidecar?)")

    def hp(key: str) -> int:
        return int(_require(reader, key.format(arch=arch), path))

    head, head_source, facts_reader = read_head(reader, path), path, reader
    if head_path is None and head is None and sidecar_path(path).is_file():
        head_path = sidecar_path(path)
    if head_path is not None:
        head_path = Path(head_path)
        side = read_gguf(head_path)
        head, head_source, facts_reader = read_head(side, head_path), head_path, side
        if head is None:
            raise BadModelFileError(f"{head_path}: no SPRM head in this file")
    if head is None:
        head_source = None

    n_embd, n_layers = hp(gguf.Keys.LLM.EMBEDDING_LENGTH), hp(gguf.Keys.LLM.BLOCK_COUNT)
    if head is not None:
        if head.hidden_size != n_embd:
            raise BadModelFileError(
                f"{head_source}: SPRM head hidden size {head.hidden_size} != model's {n_embd}"
            )
        if not 0 <= head.feature_layer < n_layers:
            raise BadModelFileError(
                f"{head_source}: SPRM feature layer {head.feature_layer} outside 0..{n_layers - 1}"
            )
    step_ids = _field(facts_reader, keys.STEP_TOKEN_IDS)
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    n_vocab = len(tokens.data) if tokens is not None else 0
    ftype = _field(reader, gguf.Keys.General.FILE_TYPE)

    def token_text(key: str) -> str:
        tid = _field(reader, key)
        return (
            tokens.contents(int(tid))
            if tokens is not None and tid is not None and int(tid) < n_vocab
            else ""
        )

    template = _field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return ModelFile(
        path=path,
        arch=arch,
        name=str(_field(reader, gguf.Keys.General.NAME) or path.stem),
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=hp(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        n_head=hp(gguf.Keys.Attention.HEAD_COUNT),
        n_head_kv=hp(gguf.Keys.Attention.HEAD_COUNT_KV),
        n_vocab=n_vocab,
        context_length=hp(gguf.Keys.LLM.CONTEXT_LENGTH),
        file_type=-1 if ftype is None else int(ftype),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors)),
        head=head,
        head_source=head_source,
        step_token_ids=tuple(int(x) for x in (step_ids if step_ids is not None else ())),
        think_start_id=_int_or(facts_reader, keys.THINK_START_ID, -1),
        think_end_id=_int_or(facts_reader, keys.THINK_END_ID, -1),
        chat_template=str(template) if template is not None else None,
        bos_token=token_text(gguf.Keys.Tokenizer.BOS_ID),
        eos_token=token_text(gguf.Keys.Tokenizer.EOS_ID),
        default_strategy=_string_or_none(reader, keys.DEFAULT_STRATEGY),
    )


def _string_or_none(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None or f.types != [gguf.GGUFValueType.STRING]:
        return None
    return str(f.contents())


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
) -> Path:
    """Write a head-only GGUF (SPEC §2 keys, no tensors) from arrays, atomically."""
    path = Path(path)
    if not rule.step_token_ids:
        raise EdgeMetastoneError("a head needs its step delimiter ids")
    with atomic_output(path) as tmp:
        writer = ArrayGGUFWriter(tmp, arch)
        _write_head(writer, head, rule)
        for key, value in (extra or {}).items():
            writer.add_string(key, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    return path


def _copy_field(writer: ArrayGGUFWriter, field: gguf.ReaderField) -> None:
    vtype = field.types[0]
    if vtype is gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub is gguf.GGUFValueType.STRING or len(field.types) > 2:
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        else:
            writer.add_numpy_array(field.name, np.asarray(field.parts[field.data[0]]))
        return
    writer.add_key_value(field.name, field.contents(), vtype)


def write_model_copy(
    src: Path | str,
    dst: Path | str,
    *,
    head: SprmHead | None = None,
    rule: StepRule | None = None,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Copy model file `src` to `dst`, with `head` (and `rule`'s step facts) replacing any head in
    the metadata and the `extra` string keys set; every other key and every tensor byte is copied
    unchanged. `src` is never modified."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise EdgeMetastoneError(f"{dst}: refusing to overwrite the input model file")
    mf = open_model_file(src)
    if head is not None:
        if rule is None or not rule.step_token_ids:
            raise EdgeMetastoneError("a head needs its step delimiter ids")
        if head.hidden_size != mf.n_embd or not 0 <= head.feature_layer < mf.n_layers:
            raise EdgeMetastoneError(
                f"the head (C={head.hidden_size}, layer {head.feature_layer}) does not fit {src} "
                f"(C={mf.n_embd}, {mf.n_layers} layers)"
            )
    extra = dict(extra or {})
    reader = read_gguf(src)
    with atomic_output(dst) as tmp:
        writer = ArrayGGUFWriter(tmp, mf.arch)
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for field in reader.fields.values():
            name = field.name
            if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
                continue
            if (head is not None and name in _HEAD_KEYS) or name in extra:
                continue
            _copy_field(writer, field)
        if head is not None:
            _write_head(writer, head, rule)
        for key, value in extra.items():
            writer.add_string(key, value)
        for t in reader.tensors:
            writer.add_tensor_info(
                t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data)
        writer.close()
    return dst


def provenance(mf_path: Path | str) -> dict:
    """The file's `metastone.provenance` JSON (empty when absent or unreadable)."""
    raw = _field(read_gguf(Path(mf_path)), keys.PROVENANCE)
    try:
        value = json.loads(str(raw)) if raw is not None else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
