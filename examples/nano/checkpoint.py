"""MetaStone-nano's Hugging Face side: its byte-level BPE tokenizer, chat template, config, save.

The tokenizer is Qwen2's design (NFC normalizer, Qwen2 pre-tokenizer regex, byte-level BPE with
the full byte alphabet, so any text tokenizes) trained on the task's own conversations, with
`.\\n\\n` as one token and `<think>` / `</think>` as added tokens.
"""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

from task import STEP, problems
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import processors as tk_processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
BPE_VOCAB_SIZE = 384
VOCAB_MULTIPLE = 64

# Qwen's ChatML with the generation prompt opening the think window, as MetaStone-S1's does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    "{%- endif %}"
)
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"


def chat_prompt(user: str) -> str:
    """The rendered template for one user turn (what the model is fed)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n{GENERATION_PROMPT}"


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for p in problems(seed, n):
        docs.append(chat_prompt(p.prompt) + p.response())
        if rng.random() < 0.2:  # a little plain English so common words are single tokens
            docs.append(f"The answer to {p.prompt} is {p.answer}.")
    return docs


def build_tokenizer(seed: int = 0, n_docs: int = 4000) -> Tokenizer:
    """Train the BPE on task conversations and append the added tokens."""
    tok = Tokenizer(BPE(unk_token=None, byte_fallback=False, ignore_merges=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = tk_processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(seed, n_docs), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    step = tok.encode(STEP, add_special_tokens=False).ids
    if len(step) != 1:
        raise RuntimeError(f"'.\\n\\n' must be one token, got {step}")
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """A Qwen2-style tokenizer_config.json."""
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in (*SPECIAL_TOKENS, *THINK_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def qwen2_config(tok: Tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int, ff: int):
    """A Qwen2Config for the tokenizer (vocab rounded up to 64, as real checkpoints are)."""
    from transformers import Qwen2Config

    n = tok.get_vocab_size(with_added_tokens=True)
    kwargs = dict(
        vocab_size=(n + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE * VOCAB_MULTIPLE,
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        use_sliding_window=False,
        max_window_layers=layers,
    )
    if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        kwargs["rope_theta"] = 10000.0
    return Qwen2Config(**kwargs)


def save_checkpoint(model, tok: Tokenizer, out_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer.json + tokenizer_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2))
