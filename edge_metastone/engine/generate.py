"""k candidates as one batch over a shared prompt cache, every step scored in the same forward pass.

prefill(prompt) once in sequence 0 -> llama_memory_seq_cp to sequences 1..k-1
loop: sample each live sequence from its row -> score a step boundary from the feature of the
      token just decoded -> decode all live sequences' new tokens as one batch
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

import llama_cpp
import numpy as np

from edge_metastone.candidates import CandidateRun, CandidateStream, token_logprob
from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
from edge_metastone.engine.sampling import Sampler
from edge_metastone.errors import ContextExceededError, InvalidRequestError
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.sprm import SprmHead, StepRule
from edge_metastone.types import (  # re-exported: the engine's public types live in types.py
    Candidate,
    Event,
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    KVLayout,
    SamplingSettings,
    StepEvent,
    Timings,
    TokenEvent,
    kv_cells,
    resolve_layout,
)

__all__ = [
    "BatchGenerator",
    "Candidate",
    "Event",
    "FinishEvent",
    "FinishReason",
    "GenerationControl",
    "GenerationSettings",
    "SamplingSettings",
    "StepEvent",
    "Timings",
    "TokenEvent",
]

logger = logging.getLogger(__name__)


class _Seq(CandidateStream):
    """A candidate in llama.cpp sequence `seq_id`; its next logits are in batch row `row`."""

    __slots__ = ("head", "row", "sampler", "seq_id")

    def __init__(
        self,
        index: int,
        run: CandidateRun,
        feature: np.ndarray | None,
        seq_id: int,
        sampler: Sampler,
        row: int,
        head: SprmHead | None,
    ) -> None:
        super().__init__(index, run, feature)
        self.seq_id = seq_id
        self.sampler = sampler
        self.row = row
        self.head = head

    def step_score(self) -> float:
        """The head's score on `prev`'s feature."""
        return float(self.head.scores(self.feature[None, :])[0])


# A gap in the live sequence ids (a candidate that ended between two live ones) makes llama.cpp
# split a decode into one graph per run of consecutive ids (llama_kv_cache::init_batch ->
# split_equal), and each graph reads every weight again. A placeholder token for the ended
# sequence (at position 0 of its emptied stream, no output) keeps the run whole, for about one
# batch row's cost. Rows are cheap and graphs are not (200M Q4_0, 2 threads: ~0.8 ms per extra row,
# ~4 ms per extra graph), so gaps of up to this many ids are filled and longer ones left to split.
MAX_FILLED_GAP = 4
_FILLER_TOKEN = 0


def _add_streams(batch: Batch, ctx: Context, live: list[_Seq]) -> None:
    """Add the live sequences' tokens in increasing id order (captured rows then follow batch
    order), with placeholders in short gaps between them."""
    prev = None
    for seq in live:
        if prev is not None and 0 < seq.seq_id - prev - 1 <= MAX_FILLED_GAP:
            for gap in range(prev + 1, seq.seq_id):
                llama_cpp.llama_memory_seq_rm(ctx.memory, gap, -1, -1)
                batch.add(_FILLER_TOKEN, 0, (gap,), False)
        seq.row = batch.add(seq.prev, seq.pos, (seq.seq_id,), True)
        prev = seq.seq_id


class BatchGenerator:
    """Runs one multi-candidate generation over an open `Model`; see `generate`."""

    def __init__(
        self,
        model: Model,
        head: SprmHead | None,
        rule: StepRule,
        *,
        n_threads: int = 0,
        parity: bool = False,
    ) -> None:
        self.model = model
        self.head = head
        self.rule = rule
        self.n_threads = n_threads
        self.parity = parity

    @property
    def feature_layer(self) -> int:
        """The layer whose output feeds the head: the head's, else L-2 (SPEC §1)."""
        return self.head.feature_layer if self.head is not None else self.model.n_layer - 2

    def _check(
        self, prompt_ids: Sequence[int], k: int, settings: GenerationSettings, layout: KVLayout
    ) -> int:
        if k < 1:
            raise InvalidRequestError(f"k must be >= 1 (got {k})")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        n = len(prompt_ids)
        if n + settings.max_new_tokens > self.model.n_ctx_train:
            raise ContextExceededError(
                f"prompt ({n} tokens) + max_new_tokens ({settings.max_new_tokens}) exceeds the "
                f"model's context of {self.model.n_ctx_train} tokens"
            )
        return kv_cells(n, settings.max_new_tokens, k, layout)

    def generate(
        self,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        control: GenerationControl | None = None,
        candidate_offset: int = 0,
    ) -> Iterator[Event]:
        """Yield token, step and finish events for k candidates; candidate i samples with seed (seed, offset+i)."""
        layout = resolve_layout(settings.kv_layout, k, len(prompt_ids), settings.max_new_tokens)
        n_ctx = self._check(prompt_ids, k, settings, layout)
        prompt = list(prompt_ids)
        control = control or GenerationControl()
        t_start = time.perf_counter()
        tm = control.timings  # this call's own timings (added to what the control holds)
        tm.prompt_tokens += len(prompt)
        scoring = settings.score_steps and self.head is not None
        keep = settings.keep_features
        n_batch = max(min(len(prompt), PREFILL_BATCH), k)
        capture = (
            FeatureCapture(self.feature_layer, self.model.n_embd, capacity=n_batch)
            if scoring or keep
            else None
        )
        streams = layout is KVLayout.STREAMS
        ctx_settings = ContextSettings(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_seq_max=k,
            n_threads=self.n_threads,
            parity=self.parity,
            kv_unified=not streams,
            kv_type=settings.kv_type.value,
        )
        tm.kv_layout = layout.value
        tm.kv_type = "f32" if self.parity else settings.kv_type.value
        plan = self.model.weight_plan
        tm.weight_buffers = plan.mode.value
        tm.weight_buffers_reason = f"{plan.requested.value}: {plan.reason}"
        with (
            Context(
                self.model,
                ctx_settings,
                cb_eval=capture.callback if capture else None,
                cb_user_data=capture.user_data if capture else None,
            ) as ctx,
            Batch(n_batch, 1) as batch,
        ):
            t0 = time.perf_counter()
            prompt_feats, last_feature, last_row = self._prefill(ctx, batch, prompt, capture)
            prompt_scores = self._score_prompt(prompt_feats) if scoring else {}
            tm.prefill_s += time.perf_counter() - t0
            run = CandidateRun(
                prompt,
                self.rule,
                settings,
                scoring,
                tm,
                self.model.n_embd,
                prompt_scores,
                prompt_feats,
            )
            seqs = []
            for s in range(k):
                if s:
                    llama_cpp.llama_memory_seq_cp(ctx.memory, 0, s, -1, -1)
                sampler = Sampler(sampling, candidate_offset + s, self.model.n_vocab)
                if sampling.repeat_penalty != 1.0:
                    sampler.accept_all(prompt)
                seqs.append(
                    _Seq(candidate_offset + s, run, last_feature, s, sampler, last_row, self.head)
                )
            live = seqs
            try:
                while live:
                    batch.clear()
                    for seq in live:
                        tok = self._next_token(seq, ctx, control)
                        if tok is not None:
                            yield from seq.accept(tok, self.model.token_to_bytes(tok))
                    for seq in live:
                        if seq.reason is not None:
                            yield seq.finish()
                            llama_cpp.llama_memory_seq_rm(ctx.memory, seq.seq_id, -1, -1)
                    live = [seq for seq in live if seq.reason is None]
                    if not live:
                        break
                    if streams:
                        _add_streams(batch, ctx, live)
                    else:
                        for seq in live:
                            seq.row = batch.add(seq.prev, seq.pos, (seq.seq_id,), True)
                    t0 = time.perf_counter()
                    ctx.decode(batch)
                    if capture is not None:
                        feats = capture.take()
                        for seq in live:
                            seq.feature = feats[seq.row]
                    tm.decode_s += time.perf_counter() - t0
                    tm.decode_steps += 1
            finally:
                for seq in seqs:
                    seq.sampler.close()
                tm.total_s += time.perf_counter() - t_start

    def _prefill(
        self, ctx: Context, batch: Batch, prompt: list[int], capture: FeatureCapture | None
    ) -> tuple[dict[int, np.ndarray], np.ndarray | None, int]:
        """Decode the prompt in sequence 0; keep the features of its step boundaries (they count
        when there is no <think> window) and of its last token."""
        wanted = {
            j - 1
            for j in range(1, len(prompt))
            if self.rule.is_step_boundary(prompt[j - 1], prompt[j])
        }
        feats: dict[int, np.ndarray] = {}
        last_row = 0
        for start, count in ctx.prefill(batch, prompt):
            last_row = count - 1  # the final chunk's last row holds the prompt's last logits
            if capture is not None:
                rows = capture.take()
                for i in range(count):
                    if start + i in wanted or start + i == len(prompt) - 1:
                        feats[start + i] = rows[i]
        last = feats.get(len(prompt) - 1)
        return {i: feats[i].copy() for i in wanted if i in feats}, last, last_row

    def _score_prompt(self, feats: dict[int, np.ndarray]) -> dict[int, float]:
        if not feats:
            return {}
        order = sorted(feats)
        values = self.head.scores(np.stack([feats[i] for i in order]))
        return {i: float(v) for i, v in zip(order, values, strict=True)}

    def _next_token(self, seq: _Seq, ctx: Context, control: GenerationControl) -> int | None:
        """Sample `seq`'s next token; None when it finished instead (halted, pruned, end of turn)."""
        if seq.halted(control):
            return None
        tm = seq.run.timings
        t0 = time.perf_counter()
        tok = seq.sampler.sample(ctx.ptr, seq.row)
        if seq.run.settings.logprobs:
            seq.logprob_sum += token_logprob(ctx.logits(seq.row), tok)
        tm.sample_s += time.perf_counter() - t0
        if self.model.is_eog(tok):
            seq.reason = FinishReason.EOS
            return None
        return tok
