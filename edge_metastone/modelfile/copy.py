"""Copy a model GGUF, optionally with a new SPRM head and extra string keys; read its provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

from edge_metastone import keys
from edge_metastone.errors import BadModelFileError, EdgeMetastoneError
from edge_metastone.gguf_io import ArrayGGUFWriter, atomic_output
from edge_metastone.modelfile.head import _HEAD_KEYS, _write_head
from edge_metastone.modelfile.read import _Meta, open_model_file, read_gguf
from edge_metastone.sprm import SprmHead, StepRule


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
    m = _Meta(read_gguf(Path(mf_path)), Path(mf_path))
    try:
        value = json.loads(m.str(keys.PROVENANCE, "{}"))
    except (ValueError, BadModelFileError):
        return {}
    return value if isinstance(value, dict) else {}
