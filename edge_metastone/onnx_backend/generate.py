"""k candidates over one prefilled prompt on onnxruntime, every step scored from the graph's
`sprm_logits` output. The same loop and event order as the llama.cpp generator
(`engine/generate.py`):

prefill(prompt) once as one row -> copy its KV cache to k rows
loop: sample each live row from its logits -> score a step boundary from the step logit of the
      token just decoded -> run all live rows' new tokens as one [B, 1] batch (finished rows are
      dropped from the cache, so rows never need padding)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge_metastone.candidates import CandidateRun, CandidateStream, token_logprob
from edge_metastone.errors import ContextExceededError, InvalidRequestError
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.onnx_backend.modeldir import HfTokenizer, OnnxModelDir
from edge_metastone.onnx_backend.sampling import NumpySampler
from edge_metastone.onnx_backend.session import KVCache, Session
from edge_metastone.sprm import StepRule
from edge_metastone.types import (
    Event,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    SamplingSettings,
)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Step scores from step logits, in float64 without overflow (as `SprmHead.scores`)."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.exp(-np.logaddexp(0.0, -z))


class _Seq(CandidateStream):
    """A candidate in one row of the batch; `logits` [V] and `step_logit` are `prev`'s."""

    __slots__ = ("logits", "sampler", "step_logit")

    def __init__(
        self,
        index: int,
        run: CandidateRun,
        feature: np.ndarray | None,
        sampler: NumpySampler,
        logits: np.ndarray,
        step_logit: float | None,
    ) -> None:
        super().__init__(index, run, feature)
        self.sampler = sampler
        self.logits = logits
        self.step_logit = step_logit  # the head's logit on `prev`'s feature

    def step_score(self) -> float | None:
        """sigmoid of the graph's step logit on `prev`."""
        return None if self.step_logit is None else float(sigmoid(self.step_logit))


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
        if settings.kv_type is not KVType.F16 or (settings.kv_layout is KVLayout.UNIFIED and k > 1):
            raise InvalidRequestError(
                "the ONNX backend keeps one float cache per candidate: no kv_type or unified layout"
            )
        control = control or GenerationControl()
        t_start = time.perf_counter()
        tm = control.timings
        tm.prompt_tokens += len(prompt)
        tm.kv_layout, tm.kv_type = KVLayout.STREAMS.value, "f32"  # each row attends over its own
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
            run = CandidateRun(
                prompt,
                self.rule,
                settings,
                scoring,
                tm,
                self.md.hidden_size,
                prompt_scores,
                {p: f for p, f in pre.features.items() if p in wanted},
            )
            last = len(prompt) - 1
            seqs = []
            for s in range(k):
                if sampling.repeat_penalty != 1.0:
                    samplers[s].accept_all(prompt)
                seqs.append(
                    _Seq(
                        candidate_offset + s,
                        run,
                        pre.features.get(last),
                        samplers[s],
                        pre.logits,
                        pre.step_logits.get(last),
                    )
                )
            live = seqs
            while live:
                for seq in live:
                    tok = self._next_token(seq, control)
                    if tok is not None:
                        yield from seq.accept(tok, self.tok.token_bytes(tok))
                for seq in live:
                    if seq.reason is not None:
                        yield seq.finish()
                still = [seq for seq in live if seq.reason is None]
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

    def _next_token(self, seq: _Seq, control: GenerationControl) -> int | None:
        """Sample `seq`'s next token; None when it finished instead (halted, pruned, end of turn)."""
        if seq.halted(control):
            return None
        tm = seq.run.timings
        t0 = time.perf_counter()
        tok = seq.sampler.sample(seq.logits)
        if seq.run.settings.logprobs:
            seq.logprob_sum += token_logprob(seq.logits, tok)
        tm.sample_s += time.perf_counter() - t0
        if tok in self.eog:
            seq.reason = FinishReason.EOS
            return None
        return tok
