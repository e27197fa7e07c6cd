"""k candidates as one batch over a shared prompt cache, every step scored in the same forward pass.

prefill(prompt) once in sequence 0 -> llama_memory_seq_cp to sequences 1..k-1
loop: sample each live sequence from its row -> score a step boundary from the feature of the
      token just decoded -> decode all live sequences' new tokens as one batch
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
from edge_metastone.engine.sampling import Sampler
from edge_metastone.errors import ContextExceededError, EdgeMetastoneError, InvalidRequestError
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.sprm import SprmHead, StepRule, trajectory_score
from edge_metastone.textstream import ThinkState as _ThinkState
from edge_metastone.textstream import safe_end
from edge_metastone.textstream import stop_match as _stop_match
from edge_metastone.types import (  # re-exported: the engine's public types live in types.py
    Candidate,
    Event,
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
    Timings,
    TokenEvent,
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


@dataclass(eq=False)  # compared by identity: it holds numpy arrays
class _Seq:
    index: int
    seq_id: int
    sampler: Sampler
    prev: int  # last token of the sequence (prompt's last, then generated)
    pos: int  # position of `prev`
    feature: np.ndarray | None  # feature of `prev`
    tokens: list[int] = field(default_factory=list)
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    text: str = ""
    ends: list[int] = field(default_factory=list)  # len(text) after each token
    streamed: int = 0  # characters of text already sent in TokenEvents
    scores_by_pos: dict[int, float] = field(default_factory=dict)
    features_by_pos: dict[int, np.ndarray] = field(default_factory=dict)
    online: list[float] = field(default_factory=list)
    think: _ThinkState = field(default_factory=lambda: _ThinkState())
    answer_tokens: int = 0
    logprob_sum: float = 0.0
    row: int = -1
    reason: FinishReason | None = None


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

    def _check(self, prompt_ids: Sequence[int], k: int, settings: GenerationSettings) -> int:
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
        return n + k * settings.max_new_tokens

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
        n_ctx = self._check(prompt_ids, k, settings)
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
        ctx_settings = ContextSettings(
            n_ctx=n_ctx, n_batch=n_batch, n_seq_max=k, n_threads=self.n_threads, parity=self.parity
        )
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
            prompt_think = _ThinkState()
            for i, t in enumerate(prompt):
                prompt_think.note(self.rule, t, i)
            seqs = []
            for s in range(k):
                if s:
                    llama_cpp.llama_memory_seq_cp(ctx.memory, 0, s, -1, -1)
                sampler = Sampler(sampling, candidate_offset + s, self.model.n_vocab)
                if sampling.repeat_penalty != 1.0:
                    sampler.accept_all(prompt)
                seq = _Seq(
                    candidate_offset + s, s, sampler, prompt[-1], len(prompt) - 1, last_feature
                )
                seq.scores_by_pos.update(prompt_scores)
                if keep:
                    seq.features_by_pos.update(prompt_feats)
                seq.row = last_row
                seq.think = dataclasses.replace(prompt_think)
                seqs.append(seq)
            live = seqs
            try:
                while live:
                    batch.clear()
                    still: list[_Seq] = []
                    for seq in live:
                        yield from self._advance(seq, ctx, settings, control, still, tm, scoring)
                    for seq in live:
                        if seq not in still:
                            result = self._finish(seq, prompt, scoring, settings)
                            yield FinishEvent(seq.index, result, result.text[seq.streamed :])
                            llama_cpp.llama_memory_seq_rm(ctx.memory, seq.seq_id, -1, -1)
                    live = still
                    if not live:
                        break
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

    def _advance(
        self,
        seq: _Seq,
        ctx: Context,
        settings: GenerationSettings,
        control: GenerationControl,
        still: list[_Seq],
        tm: Timings,
        scoring: bool,
    ) -> Iterator[Event]:
        """Sample one token for `seq`, score a boundary, and decide whether it goes on."""
        if control.halted or seq.index in control.pruned:
            seq.reason = FinishReason.HALTED if control.halted else FinishReason.PRUNED
            return
        t0 = time.perf_counter()
        tok = seq.sampler.sample(ctx.ptr, seq.row)
        if settings.logprobs:
            logits = ctx.logits(seq.row).astype(np.float64)
            m = logits.max()
            seq.logprob_sum += float(logits[tok] - m - np.log(np.exp(logits - m).sum()))
        tm.sample_s += time.perf_counter() - t0
        if self.model.is_eog(tok):
            seq.reason = FinishReason.EOS
            return
        pos = seq.pos + 1
        boundary = seq.feature is not None and self.rule.is_step_boundary(seq.prev, tok)
        if boundary and settings.keep_features:
            seq.features_by_pos[seq.pos] = seq.feature.copy()  # a row of a [k, C] decode
        if boundary and scoring:
            t0 = time.perf_counter()
            score = float(self.head.scores(seq.feature[None, :])[0])
            if not math.isfinite(score):
                raise EdgeMetastoneError(
                    f"the model produced a non-finite step score at token {seq.pos} "
                    "(its weights or head are broken)"
                )
            tm.score_s += time.perf_counter() - t0
            seq.scores_by_pos[seq.pos] = score
            start = seq.think.start_pos if seq.think.starts == 1 else 0
            if seq.pos >= start + 1 and seq.think.end_pos < 0:
                seq.online.append(score)
                yield StepEvent(
                    seq.index, seq.pos, score, len(seq.online), trajectory_score(seq.online)
                )
        seq.think.note(self.rule, tok, pos)
        seq.tokens.append(tok)
        tm.generated_tokens += 1
        piece = seq.utf8.decode(self.model.token_to_bytes(tok))
        seq.text += piece
        seq.ends.append(len(seq.text))
        seq.prev, seq.pos = tok, pos
        if 0 <= seq.think.end_pos < pos:
            seq.answer_tokens += 1
        cut = _stop_match(seq.text, len(piece), settings.stop)
        if cut is not None:
            # keep the tokens that end before the stop string: text == their decoding, and no
            # character of the stop string was streamed (it was held back below)
            n = bisect.bisect_right(seq.ends, cut)
            del seq.tokens[n:], seq.ends[n:]
            seq.text = seq.text[: seq.ends[-1] if n else 0]
            seq.reason = FinishReason.STOP
            yield TokenEvent(seq.index, tok, "")
            return
        safe = _safe_end(seq, settings.stop)
        yield TokenEvent(seq.index, tok, seq.text[seq.streamed : safe])
        seq.streamed = max(seq.streamed, safe)
        over_answer = (
            settings.max_answer_tokens is not None
            and seq.answer_tokens >= settings.max_answer_tokens
        )
        if len(seq.tokens) >= settings.max_new_tokens or (seq.think.end_pos >= 0 and over_answer):
            seq.reason = FinishReason.LENGTH
            return
        still.append(seq)

    def _finish(
        self, seq: _Seq, prompt: list[int], scoring: bool, settings: GenerationSettings
    ) -> Candidate:
        if seq.reason is None:
            seq.reason = FinishReason.LENGTH
        if seq.reason is not FinishReason.STOP:
            seq.text += seq.utf8.decode(b"", final=True)
            if seq.ends:
                seq.ends[-1] = len(seq.text)
        positions: list[int] = []
        steps: list[float] = []
        score: float | None = None
        features: np.ndarray | None = None
        if scoring or settings.keep_features:
            positions = self.rule.scored_positions(prompt + seq.tokens)
        if scoring:
            steps = [seq.scores_by_pos[p] for p in positions]
            score = trajectory_score(steps)
        if settings.keep_features:
            rows = [seq.features_by_pos[p] for p in positions]
            features = np.stack(rows) if rows else np.empty((0, self.model.n_embd), np.float32)
        n = len(seq.tokens)
        return Candidate(
            index=seq.index,
            token_ids=list(seq.tokens),
            text=seq.text,
            step_positions=positions,
            step_scores=steps,
            score=score,
            finish_reason=seq.reason,
            mean_logprob=(seq.logprob_sum / n if n else 0.0) if settings.logprobs else None,
            step_features=features,
        )


def _safe_end(seq: _Seq, stops: Sequence[str]) -> int:
    """How much text may be streamed (see `textstream.safe_end`)."""
    return safe_end(seq.text, seq.ends, stops)
