"""Independent float32 Hugging Face reference of the MetaStone-S1 SPRM scorer (SPEC section 1).

Written from the spec alone; it must not import edge_metastone, so parity tests compare two
implementations rather than one with itself.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

STEP_TEXT = ".\n\n"
THINK_START = "<think>"
THINK_END = "</think>"
SCORE_FLOOR = 1e-10


def make_head(hidden_size: int) -> nn.Sequential:
    """The SPRM head: Linear(C, 2C) -> ReLU -> Dropout(0.5) -> Linear(2C, 1)."""
    c = hidden_size
    return nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * c, 1))


def load_reference(hf_dir: str | Path):
    """Load (model, tokenizer, head) in float32 eval mode from a MetaStone HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = Path(hf_dir)
    # transformers 5 renamed torch_dtype -> dtype and defaults to dtype="auto"; be explicit.
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    head = make_head(model.config.hidden_size)
    state = torch.load(hf_dir / "score_module.pt", map_location="cpu", weights_only=True)
    head.load_state_dict(state)
    head.to(torch.float32).eval()
    return model, tokenizer, head


@torch.no_grad()
def reference_forward(model, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (logits [T, V], features [T, C]) as float32; features are hidden_states[-2]."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    logits = out.logits[0].float().numpy()
    features = out.hidden_states[-2][0].float().numpy()
    return logits.astype(np.float32), features.astype(np.float32)


def scored_positions(
    token_ids: Sequence[int],
    step_ids: Collection[int],
    think_start_id: int | None,
    think_end_id: int | None,
) -> list[int]:
    """Feature indices i = j-1 of the delimiters j that the SPRM scores (SPEC section 1)."""
    ids = list(token_ids)
    steps = set(step_ids)
    n_start = ids.count(think_start_id) if think_start_id is not None else 0
    n_end = ids.count(think_end_id) if think_end_id is not None else 0
    start = ids.index(think_start_id) if n_start == 1 else 0
    end = ids.index(think_end_id) if n_end == 1 else len(ids)
    positions = []
    for j in range(1, len(ids)):
        if ids[j] not in steps:
            continue
        prev = ids[j - 1]
        if prev in steps or (think_start_id is not None and prev == think_start_id):
            continue
        i = j - 1
        if start + 1 <= i <= end - 1:
            positions.append(i)
    return positions


def trajectory_score(step_scores: Sequence[float]) -> float:
    """Geometric mean of step scores, each clamped to >= 1e-10; 0.0 when there are none."""
    if len(step_scores) == 0:
        return 0.0
    logs = [math.log(max(float(s), SCORE_FLOOR)) for s in step_scores]
    return math.exp(sum(logs) / len(logs))


@torch.no_grad()
def head_scores(head: nn.Module, features: np.ndarray) -> list[float]:
    """sigmoid(head(features)) for features [N, C], as Python floats."""
    if len(features) == 0:
        return []
    logits = head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))[:, 0]
    return [float(s) for s in torch.sigmoid(logits)]


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(tid)


def reference_score(model, tokenizer, head, text: str) -> dict:
    """Score one full text the way the official MetaStone scorer does."""
    token_ids = list(tokenizer.encode(text, add_special_tokens=False))
    step_ids = list(tokenizer.encode(STEP_TEXT, add_special_tokens=False))
    positions = scored_positions(
        token_ids, step_ids, _token_id(tokenizer, THINK_START), _token_id(tokenizer, THINK_END)
    )
    step_scores: list[float] = []
    if positions:
        _, features = reference_forward(model, token_ids)
        step_scores = head_scores(head, features[positions])
    return {
        "token_ids": token_ids,
        "positions": positions,
        "step_scores": step_scores,
        "score": trajectory_score(step_scores),
    }
