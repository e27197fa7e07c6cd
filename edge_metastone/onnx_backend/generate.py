"""k candidates over one prefilled prompt on onnxruntime, every step scored from the graph's
`sprm_logits` output. The same loop and event order as the llama.cpp generator
(`engine/generate.py`):

prefill(prompt) once as one row -> copy its KV cache to k rows
loop: sample each live row from its logits -> score a step boundary from the step logit of the
      token just decoded -> run all live rows' new tokens as one [B, 1] batch (finished rows are
      dropped from the cache, so rows never need padding)
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_metastone.errors import ContextExceededError, EdgeMetastoneError, InvalidRequestError
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.onnx_backend.modeldir import HfTokenizer, OnnxModelDir
from edge_metastone.onnx_backend.sampling import NumpySampler
from edge_metastone.onnx_backend.session import KVCache, Session
from edge_metastone.sprm import StepRule, trajectory_score
from edge_metastone.textstream import ThinkState, safe_end, stop_match
from edge_metastone.types import (
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


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Step scores from step logits, in float64 without overflow (as `SprmHead.scores`)."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.exp(-np.logaddexp(0.0, -z))


@dataclass(eq=False)  # compared by identity: it holds numpy arrays
class _Seq:
    index: int
    sampler: NumpySampler
    prev: int
    pos: int
    logits: np.ndarray  # [V] of `prev`
    step_logit: float | None  # the head's logit on `prev`'s feature
    feature: np.ndarray | None  # `prev`'s feature (keep_features)
    tokens: list[int] = field(default_factory=list)
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    text: str = ""
    ends: list[int] = field(default_factory=list)
    streamed: int = 0
    scores_by_pos: dict[int, float] = field(default_factory=dict)
    features_by_pos: dict[int, np.ndarray] = field(default_factory=dict)
    online: list[float] = field(default_factory=list)
    think: ThinkState = field(default_factory=ThinkState)
    answer_tokens: int = 0
    logprob_sum: float = 0.0
    reason: FinishReason | None = None


@dataclass
class _Prefill:
    cache: KVCache
    logits: np.ndarray  # [V] of the prompt's last token
    step_logits: dict[int, float]  # scored-candidate positions of the prompt (and the last)
    features: dict[int, np.ndarray]


class OnnxGenerator:
    """Runs one multi-candidate generation over an open `Session`."""

    def __init__(self, session: Session, md: OnnxModelDir, tok: HfTokenizer, rule: StepRule):
        self.session, self.md, self.tok, self.rule = session, md, tok, rule
        self.eog = frozenset(md.eog_token_ids)

    def prefill(
        self, prompt: Sequence[int], wanted: set[int], *, sprm: bool, features: bool
    ) -> _Prefill:
        """Run the prompt in PREFILL_BATCH chunks as one row; keep the step logits (and
        features) at `wanted` positions and the last token's."""
        cache = KVCache.empty(self.md)
        steps: dict[int, float] = {}
        feats: dict[int, np.ndarray] = {}
        last = len(prompt) - 1
        logits = None
        for start in range(0, len(prompt), PREFILL_BATCH):
            chunk = np.asarray([prompt[start : start + PREFILL_BATCH]], dtype=np.int64)
            out = self.session.forward(chunk, cache, sprm=sprm, features=features)
            cache = out.cache
            for i in range(chunk.shape[1]):
                p = start + i
                if p in wanted or p == last:
                    if out.sprm_logits is not None:
                        steps[p] = float(out.sprm_logits[0, i])
                    if out.features is not None:
                        feats[p] = out.features[0, i].copy()
            logits = out.logits[0, -1]
        assert logits is not None
        return _Prefill(cache, logits, steps, feats)

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
        """Yield token, step and finish events for k candidates; candidate i samples with seed
        (seed, offset+i)."""
        if k < 1:
            raise InvalidRequestError(f"k must be >= 1 (got {k})")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        prompt = list(prompt_ids)
        if len(prompt) + settings.max_new_tokens > self.md.context_length:
            raise ContextExceededError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({settings.max_new_tokens}) "
                f"exceeds the model's context of {self.md.context_length} tokens"
            )
        if any(not 0 <= t < self.md.vocab_size for t in prompt):
            raise InvalidRequestError("the prompt has token ids outside the vocabulary")
        control = control or GenerationControl()
        t_start = time.perf_counter()
        tm = control.timings
        tm.prompt_tokens += len(prompt)
        scoring = settings.score_steps and self.md.has_head
        keep = settings.keep_features
        samplers = [
            NumpySampler(sampling, candidate_offset + s, self.md.vocab_size) for s in range(k)
        ]
        try:
            t0 = time.perf_counter()
            wanted = {
                j - 1
                for j in range(1, len(prompt))
                if self.rule.is_step_boundary(prompt[j - 1], prompt[j])
            }
            pre = self.prefill(prompt, wanted, sprm=scoring, features=keep)
            prompt_scores = {}
            if scoring:
                order = sorted(p for p in pre.step_logits if p in wanted)
                values = sigmoid([pre.step_logits[p] for p in order])
                prompt_scores = dict(zip(order, (float(v) for v in values), strict=True))
            cache = pre.cache.repeat(k)
            tm.prefill_s += time.perf_counter() - t0
            think = ThinkState()
            for i, t in enumerate(prompt):
                think.note(self.rule, t, i)
            last = len(prompt) - 1
            seqs = []
            for s in range(k):
                if sampling.repeat_penalty != 1.0:
                    samplers[s].accept_all(prompt)
                seq = _Seq(
                    candidate_offset + s,
                    samplers[s],
                    prompt[-1],
                    last,
                    pre.logits,
                    pre.step_logits.get(last),
                    pre.features.get(last),
                )
                seq.scores_by_pos.update(prompt_scores)
                if keep:
                    seq.features_by_pos.update(
                        {p: f for p, f in pre.features.items() if p in wanted}
                    )
                seq.think = dataclasses.replace(think)
                seqs.append(seq)
            live = seqs
            while live:
                still: list[_Seq] = []
                for seq in live:
                    yield from self._advance(seq, settings, control, still, tm, scoring)
                for seq in live:
                    if seq not in still:
                        result = self._finish(seq, prompt, scoring, settings)
                        yield FinishEvent(seq.index, result, result.text[seq.streamed :])
                if not still:
                    break
                if len(still) != len(live):
                    rows = {id(s): r for r, s in enumerate(live)}
                    cache = cache.take([rows[id(s)] for s in still])
                live = still
                t0 = time.perf_counter()
                ids = np.asarray([[s.prev] for s in live], dtype=np.int64)
                out = self.session.forward(ids, cache, sprm=scoring, features=keep)
                cache = out.cache
                for r, seq in enumerate(live):
                    seq.logits = out.logits[r, -1]
                    seq.step_logit = (
                        float(out.sprm_logits[r, -1]) if out.sprm_logits is not None else None
                    )
                    seq.feature = out.features[r, -1] if out.features is not None else None
                tm.decode_s += time.perf_counter() - t0
                tm.decode_steps += 1
        finally:
            tm.total_s += time.perf_counter() - t_start

    def _advance(
        self,
        seq: _Seq,
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
        tok = seq.sampler.sample(seq.logits)
        if settings.logprobs:
            logits = seq.logits.astype(np.float64)
            m = logits.max()
            seq.logprob_sum += float(logits[tok] - m - np.log(np.exp(logits - m).sum()))
        tm.sample_s += time.perf_counter() - t0
        if tok in self.eog:
            seq.reason = FinishReason.EOS
            return
        pos = seq.pos + 1
        boundary = self.rule.is_step_boundary(seq.prev, tok)
        if boundary and settings.keep_features and seq.feature is not None:
            seq.features_by_pos[seq.pos] = seq.feature.copy()  # a row of a [k, 1, C] output
        if boundary and scoring and seq.step_logit is not None:
            t0 = time.perf_counter()
            score = float(sigmoid(seq.step_logit))
            if not math.isfinite(score):
                raise EdgeMetastoneError(
                    f"the model produced a non-finite step score at token {seq.pos} "
                    "(its weights or head are broken)"
                )
            tm.score_s += time.perf_counter() - t0
            seq.scores_by_pos[seq.pos] = score
            if seq.think.in_window(seq.pos):
                seq.online.append(score)
                yield StepEvent(
                    seq.index, seq.pos, score, len(seq.online), trajectory_score(seq.online)
                )
        seq.think.note(self.rule, tok, pos)
        seq.tokens.append(tok)
        tm.generated_tokens += 1
        piece = seq.utf8.decode(self.tok.token_bytes(tok))
        seq.text += piece
        seq.ends.append(len(seq.text))
        seq.prev, seq.pos = tok, pos
        if 0 <= seq.think.end_pos < pos:
            seq.answer_tokens += 1
        cut = stop_match(seq.text, len(piece), settings.stop)
        if cut is not None:
            # keep the tokens that end before the stop string (as the llama.cpp generator)
            n = bisect.bisect_right(seq.ends, cut)
            del seq.tokens[n:], seq.ends[n:]
            seq.text = seq.text[: seq.ends[-1] if n else 0]
            seq.reason = FinishReason.STOP
            yield TokenEvent(seq.index, tok, "")
            return
        safe = safe_end(seq.text, seq.ends, settings.stop)
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
            features = np.stack(rows) if rows else np.empty((0, self.md.hidden_size), np.float32)
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
