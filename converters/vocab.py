"""The byte-level BPE vocabulary of a Qwen2 checkpoint, as llama.cpp's `gpt2` tokenizer model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from edge_metastone.errors import BadCheckpointError

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

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Write the tokenizer keys (model, pre, tokens, types, merges, special ids, chat template)."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)


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
    return BpeVocabulary(tokens=tokens, token_types=types, pre="qwen2", special=special)
