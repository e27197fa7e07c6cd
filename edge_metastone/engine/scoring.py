"""Score one full text (prompt and response) with the SPRM head, as the reference scorer does."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
from edge_metastone.errors import ContextExceededError, EdgeMetastoneError, MissingHeadError
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.modelfile.read import ModelFile, open_model_file
from edge_metastone.sprm import StepRule, trajectory_score
from edge_metastone.types import ScoreResult

__all__ = ["ScoreResult", "forward_features", "score_text", "score_tokens"]

logger = logging.getLogger(__name__)


def forward_features(
    model: Model,
    token_ids: list[int],
    layer: int,
    *,
    parity: bool = True,
    n_threads: int = 0,
    want_logits: bool = False,
    kv_type: str = "f16",
) -> tuple[np.ndarray, np.ndarray | None]:
    """One llama.cpp forward over `token_ids`: features of `l_out-{layer}` [T, C] (and logits [T, V])."""
    n = len(token_ids)
    if n == 0:
        return np.empty((0, model.n_embd), np.float32), None
    if n > model.n_ctx_train:
        raise ContextExceededError(
            f"the text is {n} tokens; the model's context is {model.n_ctx_train}"
        )
    n_batch = min(n, PREFILL_BATCH)
    capture = FeatureCapture(layer, model.n_embd, capacity=n_batch)
    settings = ContextSettings(
        n_ctx=n, n_batch=n_batch, n_threads=n_threads, parity=parity, kv_type=kv_type
    )
    logits = np.empty((n, model.n_vocab), np.float32) if want_logits else None
    with (
        Context(model, settings, cb_eval=capture.callback, cb_user_data=capture.user_data) as ctx,
        Batch(n_batch) as batch,
    ):
        chunks = []
        for start, count in ctx.prefill(batch, token_ids, all_logits=want_logits):
            chunks.append(capture.take())  # one prefill chunk's rows
            if logits is not None:
                for k in range(count):
                    logits[start + k] = ctx.logits(k)
        features = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    if features.shape[0] != n:
        raise RuntimeError(f"captured {features.shape[0]} feature rows for {n} tokens")
    return features, logits


def score_tokens(
    mf: ModelFile,
    model: Model,
    token_ids: list[int],
    *,
    parity: bool = True,
    kv_type: str = "f16",
) -> ScoreResult:
    """Score a token sequence: features at the scored positions through the head."""
    if mf.head is None:
        raise MissingHeadError(f"{mf.path} has no SPRM head; scoring is unavailable")
    rule = StepRule.of(mf.step_token_ids, mf.think_start_id, mf.think_end_id)
    positions = rule.scored_positions(token_ids)
    if not positions:
        return ScoreResult([], [], 0.0, len(token_ids), list(token_ids))
    features, _ = forward_features(
        model, token_ids, mf.head.feature_layer, parity=parity, kv_type=kv_type
    )
    steps = [float(s) for s in mf.head.scores(features[positions])]
    if not all(math.isfinite(s) for s in steps):
        raise EdgeMetastoneError(
            f"{mf.path}: the model produced non-finite step scores (its weights are broken)"
        )
    return ScoreResult(positions, steps, trajectory_score(steps), len(token_ids), list(token_ids))


def score_text(
    model_path: Path | str,
    text: str,
    *,
    head_path: Path | str | None = None,
    parity: bool = True,
    n_gpu_layers: int = 0,
) -> ScoreResult:
    """Tokenize `text` with the model's tokenizer and score it (SPEC §1)."""
    mf = open_model_file(model_path, head_path)
    if mf.head is None:
        raise MissingHeadError(f"{mf.path} has no SPRM head; scoring is unavailable")
    with Model(mf.path, n_gpu_layers=n_gpu_layers) as model:
        return score_tokens(mf, model, model.tokenize(text), parity=parity)
