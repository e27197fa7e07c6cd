"""The decode loop's slots on llama.cpp: each generation leases sequences of its model's one
long-lived context (`SequencePool`), one llama.cpp sequence per candidate over a shared prompt
cache, and each step's features are captured from the same forward pass (`FeatureCapture`), so
every step is scored without a second pass. Generations of different requests decode together:
each decode is one round of the pool, every open generation's live sequences in one batch.

prefill(prompt) in the first sequence -> llama_memory_seq_cp to the others -> each decode runs
the live sequences' new tokens (with every other generation's) as one batch; a sequence's next
logits and feature are in its batch row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_metastone.decode.slots import Prefilled
from edge_metastone.engine.llama import Model
from edge_metastone.engine.pool import SequencePool
from edge_metastone.engine.pool_types import PoolShape, Work
from edge_metastone.engine.sampling import Sampler
from edge_metastone.kvpolicy import kv_cells, pad_cells, resolve_layout
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.sprm import SprmHead
from edge_metastone.types import (
    GenerationControl,
    GenerationSettings,
    KVLayout,
    SamplingSettings,
    Timings,
)


@dataclass(frozen=True)
class LlamaSetup:
    """What every generation on one opened model shares, the sequence pool among it."""

    model: Model
    head: SprmHead | None
    feature_layer: int  # the layer whose output the head reads
    n_threads: int
    parity: bool  # F32 KV cache, no flash attention: exact parity with the reference
    pool: SequencePool


def request_shape(
    parity: bool, n_prompt: int, n_seq: int, settings: GenerationSettings, capture: bool
) -> tuple[KVLayout, PoolShape]:
    """The layout a generation runs and the pool shape it needs. One candidate runs in a stream
    of its own (the same work as a unified cache of one sequence)."""
    k = n_seq - 1 if settings.max_candidates is not None else n_seq
    layout = resolve_layout(settings.kv_layout, k, n_prompt, settings.max_new_tokens)
    if layout is KVLayout.UNIFIED and n_seq == 1 and settings.kv_layout is KVLayout.AUTO:
        layout = KVLayout.STREAMS
    streams = layout is KVLayout.STREAMS
    cells = (
        pad_cells(n_prompt + settings.max_new_tokens)
        if streams
        else kv_cells(n_prompt, settings.max_new_tokens, n_seq, KVLayout.UNIFIED)
    )
    kv_type = "f16" if parity else settings.kv_type.value
    return layout, PoolShape(n_seq, cells, streams, kv_type, parity, capture)


class LlamaSlots:
    """One generation's sequences in the model's pool; slot s is pool sequence `seqs[s]`. With
    waves (`settings.max_candidates`), slot k keeps the prompt's cells for the later waves."""

    def __init__(
        self,
        setup: LlamaSetup,
        prompt: Sequence[int],
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
        control: GenerationControl | None = None,
    ) -> None:
        self.keeper = k if settings.max_candidates is not None else None
        n_seq = k + 1 if self.keeper is not None else k
        self.keep = scoring or settings.keep_features
        n_prompt = len(prompt)
        layout, need = request_shape(setup.parity, n_prompt, n_seq, settings, self.keep)
        self.cache_prompt = settings.cache_prompt
        self.pool = pool = setup.pool
        self.model, self.head, self.scoring = setup.model, setup.head, scoring
        self.feature_width = setup.model.n_embd
        aborted = control.aborted if control is not None else None
        t0 = time.perf_counter()
        self.lease = pool.acquire(need, aborted, prompt if self.cache_prompt else ())
        tm.queue_s += time.perf_counter() - t0
        self.tm = tm
        self.seqs = self.lease.seqs
        tm.kv_layout = layout.value
        tm.kv_type = "f32" if setup.parity else settings.kv_type.value
        plan = setup.model.weight_plan
        tm.weight_buffers = plan.mode.value
        tm.weight_buffers_reason = f"{plan.requested.value}: {plan.reason}"
        self.rows = [0] * k  # slot -> batch row of its last logits and feature
        self.features: list[np.ndarray | None] = [None] * k
        self.prompt: list[int] = []
        self.prompt_features: dict[int, np.ndarray] | None = None
        self.live = set(range(k))  # slots whose candidate has not ended
        self.kept: int | None = None  # the slot that keeps the prompt's cells for the cache

    def prefill(self, prompt: list[int], wanted: set[int]) -> Prefilled:
        """Decode the prompt in the first sequence, a chunk a round, from where its cached prefix
        ends (`Lease.reused`); keep the features of its step boundaries (they count when there is
        no <think> window) and of its last token."""
        feats: dict[int, np.ndarray] = {}
        n, seq = len(prompt), self.seqs[0]
        reused = _reusable(self, wanted)
        if self.keep and reused:
            feats.update({i: f for i, f in self.lease.reused_features.items() if i < reused})
        last_row = 0
        for start in range(reused, n, PREFILL_BATCH):
            chunk = prompt[start : start + PREFILL_BATCH]
            w = self.pool.run(self.lease, Work(seq=seq, tokens=chunk, start=start, logits=True))
            self.tm.shared_rounds += w.shared
            last_row = w.out[0]
            if w.features is not None and self.keep:
                for i in range(len(chunk)):
                    if start + i in wanted or start + i == n - 1:
                        feats[start + i] = w.features[i]
        last = feats.get(n - 1)
        self.prompt = prompt
        self.rows = [last_row] * len(self.rows)
        self.features = [last] * len(self.rows)
        kept = {i: feats[i].copy() for i in wanted if i in feats}
        self.prompt_features = kept if self.keep else None
        scores = _score_prompt(self.head, kept) if self.scoring else {}
        return Prefilled(scores, kept, cached=reused)

    def fork(self, first: int, n: int) -> None:
        """Give slots first..first+n-1 the prompt. The first wave copies the first sequence's
        cells (and to the keeper); a later one copies the keeper's cells but the last, then
        decodes the prompt's last token in each new sequence for its logits and feature."""
        pool, seqs = self.pool, self.seqs
        if first == 0:
            for s in range(1, n):
                pool.copy(self.lease, seqs[0], seqs[s])
            if self.keeper is not None:
                pool.copy(self.lease, seqs[0], seqs[self.keeper])
            return
        last = len(self.prompt) - 1
        for s in range(first, first + n):
            pool.copy(self.lease, seqs[self.keeper], seqs[s], drop_from=last)
        self.decode([(s, self.prompt[last], last) for s in range(first, first + n)])

    def sampler(self, sampling: SamplingSettings, candidate: int) -> Sampler:
        """llama.cpp's own sampler chain for one candidate."""
        return Sampler(sampling, candidate, self.model.n_vocab)

    def sample(self, slot: int, sampler: Sampler) -> int:
        """Draw from `slot`'s row of the last round."""
        return sampler.sample(self.pool.ctx.ptr, self.rows[slot])

    def logits(self, slot: int) -> np.ndarray:
        """`slot`'s row of logits."""
        return self.pool.ctx.logits(self.rows[slot])

    def feature(self, slot: int) -> np.ndarray | None:
        """`slot`'s captured row (None when nothing is captured)."""
        return self.features[slot]

    def step_score(self, slot: int) -> float | None:
        """The head's score on `slot`'s captured row."""
        return float(self.head.scores(self.features[slot][None, :])[0])

    def decode(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """The slots' new tokens, in one round of the pool with every other generation's;
        their features from the same pass."""
        seqs = self.seqs
        w = self.pool.run(self.lease, Work(rows=[(seqs[s], tok, pos) for s, tok, pos in rows]))
        self.tm.shared_rounds += w.shared
        for i, (slot, _, _) in enumerate(rows):
            self.rows[slot] = w.out[i]
            if w.features is not None and self.keep:
                self.features[slot] = w.features[i]

    def free(self, slot: int) -> None:
        """Remove the sequence's cells; the last candidate's keeps the prompt's, for the prompt
        cache (a generation with waves keeps them in its keeper anyway)."""
        self.live.discard(slot)
        if self.cache_prompt and not self.live and self.keeper is None and self.prompt:
            self.kept = slot
            self.pool.drop(self.lease, self.seqs[slot], keep=len(self.prompt))
        else:
            self.pool.drop(self.lease, self.seqs[slot])

    def token_bytes(self, token: int) -> bytes:
        """The token's bytes (control tokens spelled out)."""
        return self.model.token_to_bytes(token)

    def is_eog(self, token: int) -> bool:
        """llama.cpp's end-of-generation test."""
        return self.model.is_eog(token)

    def close(self) -> None:
        """Give the sequences back to the pool, the prompt's cells kept for the prompt cache
        when the generation ran to its end."""
        slot = self.keeper if self.keeper is not None else self.kept  # each holds the prompt
        keep = None
        if self.cache_prompt and slot is not None and self.prompt:
            keep = (self.seqs[slot], self.prompt, self.prompt_features)
        self.pool.release(self.lease, keep)


def _reusable(slots: LlamaSlots, wanted: set[int]) -> int:
    """The cached prefix this generation can use: up to the first step boundary it needs a
    feature of that the cache lacks (a cache made without features: up to the first)."""
    lease, reused = slots.lease, slots.lease.reused
    if reused and slots.keep:
        have = lease.reused_features or {}
        missing = [i for i in wanted if i < reused and i not in have]
        if missing:
            reused = min(missing)
            slots.pool.drop(lease, slots.seqs[0], keep=reused)
    return reused


def _score_prompt(head: SprmHead, feats: dict[int, np.ndarray]) -> dict[int, float]:
    """The head's scores of the prompt's step features, by position."""
    if not feats:
        return {}
    order = sorted(feats)
    values = head.scores(np.stack([feats[i] for i in order]))
    return {i: float(v) for i, v in zip(order, values, strict=True)}
