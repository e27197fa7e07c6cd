"""The decode loop's steps on llama.cpp: one context per generation, one llama.cpp sequence per
candidate over a shared prompt cache, and each step's features captured from the same forward
pass (`FeatureCapture`), so every step is scored without a second pass.

prefill(prompt) in sequence 0 -> llama_memory_seq_cp to sequences 1..k-1 -> each decode runs the
live sequences' new tokens as one batch; a sequence's next logits and feature are in its batch row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from edge_metastone.decode.steps import Prefilled
from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
from edge_metastone.engine.sampling import Sampler
from edge_metastone.kvpolicy import flash_attention, kv_cells, resolve_layout
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.sprm import SprmHead
from edge_metastone.types import GenerationSettings, KVLayout, SamplingSettings, Timings

# A gap in the live sequence ids (a candidate that ended between two live ones) makes llama.cpp
# split a decode into one graph per run of consecutive ids (llama_kv_cache::init_batch ->
# split_equal), and each graph reads every weight again. A placeholder token for the ended
# sequence (at position 0 of its emptied stream, no output) keeps the run whole, for about one
# batch row's cost. Rows are cheap and graphs are not (200M Q4_0, 2 threads: ~0.8 ms per extra row,
# ~4 ms per extra graph), so gaps of up to this many ids are filled and longer ones left to split.
MAX_FILLED_GAP = 4
_FILLER_TOKEN = 0


@dataclass(frozen=True)
class LlamaSetup:
    """What every generation on one opened model shares."""

    model: Model
    head: SprmHead | None
    feature_layer: int  # the layer whose output the head reads
    n_threads: int
    parity: bool  # F32 KV cache, no flash attention: exact parity with the reference


class LlamaSteps:
    """One generation's context, batch and feature capture; slot s is llama.cpp sequence s. With
    waves (`settings.max_candidates`), sequence k keeps the prompt's cells for the later waves."""

    def __init__(
        self,
        setup: LlamaSetup,
        n_prompt: int,
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
    ) -> None:
        model, parity = setup.model, setup.parity
        layout = resolve_layout(settings.kv_layout, k, n_prompt, settings.max_new_tokens)
        self.keeper = k if settings.max_candidates is not None else None
        n_seq = k + 1 if self.keeper is not None else k
        n_batch = max(min(n_prompt, PREFILL_BATCH), n_seq)  # llama.cpp: n_seq_max <= n_batch
        keep = settings.keep_features
        self.model, self.head, self.scoring = model, setup.head, scoring
        self.feature_width = model.n_embd
        self.capture = (
            FeatureCapture(setup.feature_layer, model.n_embd, capacity=n_batch)
            if scoring or keep
            else None
        )
        self.streams = layout is KVLayout.STREAMS
        n_ctx = kv_cells(n_prompt, settings.max_new_tokens, n_seq, layout)
        n_streams = n_seq if self.streams else 1
        ctx_settings = ContextSettings(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_seq_max=n_seq,
            n_threads=setup.n_threads,
            parity=parity,
            kv_unified=not self.streams,
            kv_type=settings.kv_type.value,
            flash_attn=flash_attention(settings.kv_type, model.n_head, n_ctx, n_batch, n_streams),
        )
        tm.kv_layout = layout.value
        tm.kv_type = "f32" if parity else settings.kv_type.value
        plan = model.weight_plan
        tm.weight_buffers = plan.mode.value
        tm.weight_buffers_reason = f"{plan.requested.value}: {plan.reason}"
        cap = self.capture
        self.ctx = Context(
            model,
            ctx_settings,
            cb_eval=cap.callback if cap else None,
            cb_user_data=cap.user_data if cap else None,
        )
        try:
            self.batch = Batch(n_batch, 1)
        except BaseException:
            self.ctx.close()
            raise
        self.rows = [0] * k  # slot -> batch row of its last logits and feature
        self.features: list[np.ndarray | None] = [None] * k
        self.prompt: list[int] = []

    def prefill(self, prompt: list[int], wanted: set[int]) -> Prefilled:
        """Decode the prompt in sequence 0; keep the features of its step boundaries (they count
        when there is no <think> window) and of its last token."""
        feats: dict[int, np.ndarray] = {}
        last_row = 0
        for start, count in self.ctx.prefill(self.batch, prompt):
            last_row = count - 1  # the final chunk's last row holds the prompt's last logits
            if self.capture is not None:
                rows = self.capture.take()
                for i in range(count):
                    if start + i in wanted or start + i == len(prompt) - 1:
                        feats[start + i] = rows[i]
        last = feats.get(len(prompt) - 1)
        self.prompt = prompt
        self.rows = [last_row] * len(self.rows)
        self.features = [last] * len(self.rows)
        kept = {i: feats[i].copy() for i in wanted if i in feats}
        return Prefilled(_score_prompt(self.head, kept) if self.scoring else {}, kept)

    def fork(self, first: int, n: int) -> None:
        """Give sequences first..first+n-1 the prompt. The first wave copies sequence 0's cells
        (and to the keeper); a later one copies the keeper's cells but the last, then decodes the
        prompt's last token in each new sequence for its logits and feature."""
        mem = self.ctx.memory
        if first == 0:
            for s in range(1, n):
                llama_cpp.llama_memory_seq_cp(mem, 0, s, -1, -1)
            if self.keeper is not None:
                llama_cpp.llama_memory_seq_cp(mem, 0, self.keeper, -1, -1)
            return
        _fork_from_keeper(self, first, n)

    def sampler(self, sampling: SamplingSettings, candidate: int) -> Sampler:
        """llama.cpp's own sampler chain for one candidate."""
        return Sampler(sampling, candidate, self.model.n_vocab)

    def sample(self, slot: int, sampler: Sampler) -> int:
        """Draw from `slot`'s row of the last decode."""
        return sampler.sample(self.ctx.ptr, self.rows[slot])

    def logits(self, slot: int) -> np.ndarray:
        """`slot`'s row of logits."""
        return self.ctx.logits(self.rows[slot])

    def feature(self, slot: int) -> np.ndarray | None:
        """`slot`'s captured row (None when nothing is captured)."""
        return self.features[slot]

    def step_score(self, slot: int) -> float | None:
        """The head's score on `slot`'s captured row."""
        return float(self.head.scores(self.features[slot][None, :])[0])

    def decode(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """One batch of the live sequences' new tokens; their features from the same pass."""
        self.batch.clear()
        if self.streams:
            _add_streams(self, rows)
        else:
            for slot, tok, pos in rows:
                self.rows[slot] = self.batch.add(tok, pos, (slot,), True)
        self.ctx.decode(self.batch)
        if self.capture is not None:
            feats = self.capture.take()
            for slot, _, _ in rows:
                self.features[slot] = feats[self.rows[slot]]

    def free(self, slot: int) -> None:
        """Remove the sequence's cells."""
        llama_cpp.llama_memory_seq_rm(self.ctx.memory, slot, -1, -1)

    def token_bytes(self, token: int) -> bytes:
        """The token's bytes (control tokens spelled out)."""
        return self.model.token_to_bytes(token)

    def is_eog(self, token: int) -> bool:
        """llama.cpp's end-of-generation test."""
        return self.model.is_eog(token)

    def close(self) -> None:
        """Free the batch and the context."""
        self.batch.close()
        self.ctx.close()


def _fork_from_keeper(steps: LlamaSteps, first: int, n: int) -> None:
    """A later wave: sequences first..first+n-1 get the keeper's cells but the last, then the
    prompt's last token is decoded in each, for its logits and feature (one row a candidate)."""
    mem, last = steps.ctx.memory, len(steps.prompt) - 1
    steps.batch.clear()
    for s in range(first, first + n):
        llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem, steps.keeper, s, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, s, last, -1)
        steps.rows[s] = steps.batch.add(steps.prompt[last], last, (s,), True)
    steps.ctx.decode(steps.batch)
    if steps.capture is not None:
        feats = steps.capture.take()
        for s in range(first, first + n):
            steps.features[s] = feats[steps.rows[s]]


def _score_prompt(head: SprmHead, feats: dict[int, np.ndarray]) -> dict[int, float]:
    """The head's scores of the prompt's step features, by position."""
    if not feats:
        return {}
    order = sorted(feats)
    values = head.scores(np.stack([feats[i] for i in order]))
    return {i: float(v) for i, v in zip(order, values, strict=True)}


def _add_streams(steps: LlamaSteps, rows: Sequence[tuple[int, int, int]]) -> None:
    """The live sequences' tokens in increasing id order (captured rows then follow batch order),
    with placeholders in short gaps between them."""
    prev = None
    for slot, tok, pos in rows:
        if prev is not None and 0 < slot - prev - 1 <= MAX_FILLED_GAP:
            for gap in range(prev + 1, slot):
                llama_cpp.llama_memory_seq_rm(steps.ctx.memory, gap, -1, -1)
                steps.batch.add(_FILLER_TOKEN, 0, (gap,), False)
        steps.rows[slot] = steps.batch.add(tok, pos, (slot,), True)
        prev = slot
