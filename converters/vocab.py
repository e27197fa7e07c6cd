"""The byte-level BPE vocabulary of a Qwen2 checkpoint, as llama.cpp's `gpt2` tokenizer model."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from edge_metastone import keys
from edge_metastone.errors import BadCheckpointError
from edge_metastone.modelfile.read import SPECIAL_TOKEN_NAMES
from edge_metastone.normalization import NORMAL_FORMS

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class BpeVocabulary:
    """Tokens (as stored by llama.cpp), their types, and the special-token side of the tokenizer."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab
    normalizer: str | None = None  # the Unicode normal form tokenizer.json applies, if any
    special_tokens: dict[str, str] | None = None  # tokenizer_config.json's named special tokens

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write the tokenizer keys (model, pre, tokens, types, merges, special ids, chat template,
        and the normalizer and named special tokens that llama.cpp's own keys cannot say)."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.normalizer is not None:
            writer.add_string(keys.TOKENIZER_NORMALIZER, self.normalizer)
        if self.special_tokens is not None:
            writer.add_string(keys.TOKENIZER_SPECIAL_TOKENS, json.dumps(self.special_tokens))


def normal_form(node: Any) -> str | None:
    """The one Unicode normal form that tokenizer.json's normalizer amounts to (None: no
    normalizer). Any sequence of NFC/NFD/NFKC/NFKD equals one of them: compatibility if any step
    is, composed if the last step is. Every other normalizer is refused: the runtime cannot repeat
    it, and a file that tokenizes differently from its tokenizer would score and prompt wrongly."""
    if node is None:
        return None
    if not isinstance(node, dict):
        raise BadCheckpointError("tokenizer.json's normalizer is not an object")
    kind = node.get("type")
    steps = node.get("normalizers") if kind == "Sequence" else [node]
    if not isinstance(steps, list):
        raise BadCheckpointError("tokenizer.json's normalizer sequence is not a list")
    forms = []
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Sequence":
            inner = normal_form(step)
            forms += [inner] if inner else []
            continue
        name = step.get("type") if isinstance(step, dict) else None
        if name not in NORMAL_FORMS:
            raise BadCheckpointError(
                f"the tokenizer's normalizer {name!r} is not supported (only "
                f"{'/'.join(NORMAL_FORMS)} and sequences of them): llama.cpp would see text the "
                "tokenizer would have changed"
            )
        forms.append(name)
    if not forms:
        return None
    compat = any(f.startswith("NFK") for f in forms)
    composed = forms[-1].endswith("C")
    return ("NFK" if compat else "NF") + ("C" if composed else "D")


def _token_text(value: Any, name: str, source: str) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, an AddedToken dict or null."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise BadCheckpointError(f"{source}: {name} is not a token string")
    return value


def read_special_tokens(hf_dir: Path) -> dict[str, str] | None:
    """The tokenizer's named special tokens (bos_token, eos_token, ...) as transformers reads them
    from tokenizer_config.json (and, for configs without added_tokens_decoder, the legacy
    special_tokens_map.json); the chat template's variables. None without a tokenizer_config.json."""
    path = hf_dir / "tokenizer_config.json"
    if not path.is_file():
        logger.warning(
            "%s has no tokenizer_config.json: the chat template's bos_token/eos_token come from "
            "the BOS/EOS ids",
            hf_dir,
        )
        return None
    cfg = _read_object(path)
    values = {name: cfg.get(name) for name in SPECIAL_TOKEN_NAMES}
    legacy = hf_dir / "special_tokens_map.json"
    if "added_tokens_decoder" not in cfg and legacy.is_file():
        for name, value in _read_object(legacy).items():
            if name in values:
                values[name] = value
    out = {}
    for name, value in values.items():
        text = _token_text(value, name, path.name)
        if text is not None:
            out[name] = text
    return out


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadCheckpointError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadCheckpointError(f"{path.name} is not a JSON object")
    return value


def _pre_tokenizer_regexes(node: Any) -> list[str]:
    if not isinstance(node, dict):
        return []
    found = []
    if node.get("type") == "Split":
        pattern = node.get("pattern", {})
        found.append(pattern.get("Regex") or pattern.get("String") or "")
    for child in node.get("pretokenizers") or []:
        found += _pre_tokenizer_regexes(child)
    return found


def read_vocabulary(hf_dir: Path, n_vocab: int) -> BpeVocabulary:
    """Read tokenizer.json into llama.cpp's layout, padded with unused tokens up to the model's vocab size."""
    path = hf_dir / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadCheckpointError(f"tokenizer.json not found in {hf_dir}") from None
    except json.JSONDecodeError as e:
        raise BadCheckpointError(f"tokenizer.json is not valid JSON: {e}") from None
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise BadCheckpointError("only byte-level BPE tokenizers (as Qwen2's) are supported")
    regexes = _pre_tokenizer_regexes(tj.get("pre_tokenizer"))
    if QWEN2_PRE_REGEX not in regexes:
        raise BadCheckpointError(
            "the tokenizer's pre-tokenizer is not Qwen2's; llama.cpp would split text differently"
        )

    by_id: dict[int, tuple[str, int]] = {
        i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()
    }
    for added in tj.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if max(by_id) >= n_vocab:
        raise BadCheckpointError(
            f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))

    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        # GGUFWriter drops an empty merges list and llama.cpp then refuses the vocabulary.
        raise BadCheckpointError("tokenizer.json has no BPE merges")
    return BpeVocabulary(
        tokens=tokens,
        token_types=types,
        pre="qwen2",
        special=special,
        normalizer=normal_form(tj.get("normalizer")),
        special_tokens=read_special_tokens(hf_dir),
    )
