"""The decode loop's slots on onnxruntime: the prompt prefilled as one row, its KV cache repeated to
k rows, then every live row's new token run as one [B, 1] batch; each step is scored from the
graph's `sprm_logits` output of the same pass. A finished row is dropped from the cache at the next
decode, so rows never need padding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edge_metastone.decode.slots import Prefilled
from edge_metastone.errors import InvalidRequestError
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.onnx_backend.modeldir import HfTokenizer, OnnxModelDir
from edge_metastone.onnx_backend.sampling import NumpySampler
from edge_metastone.onnx_backend.session import KVCache, Session
from edge_metastone.sprm import sigmoid
from edge_metastone.types import GenerationSettings, KVLayout, KVType, SamplingSettings, Timings


@dataclass
class PromptPass:
    """One row's pass over a prompt: its cache, the last token's logits, and the step logits (and
    features) at the positions asked for and the last one."""

    cache: KVCache
    logits: np.ndarray  # [V] of the prompt's last token
    step_logits: dict[int, float]
    features: dict[int, np.ndarray]


def prompt_pass(
    session: Session,
    md: OnnxModelDir,
    prompt: Sequence[int],
    wanted: set[int],
    *,
    sprm: bool,
    features: bool,
) -> PromptPass:
    """Run the prompt in PREFILL_BATCH chunks as one row; keep the step logits (and features) at
    `wanted` positions and the last token's."""
    cache = KVCache.empty(md)
    steps: dict[int, float] = {}
    feats: dict[int, np.ndarray] = {}
    last = len(prompt) - 1
    logits = None
    for start in range(0, len(prompt), PREFILL_BATCH):
        chunk = np.asarray([prompt[start : start + PREFILL_BATCH]], dtype=np.int64)
        out = session.forward(chunk, cache, sprm=sprm, features=features)
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
    return PromptPass(cache, logits, steps, feats)


class OnnxSlots:
    """One generation's cache rows; `rows[r]` is the slot in cache row r."""

    def __init__(
        self,
        session: Session,
        tok: HfTokenizer,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
    ) -> None:
        self.on_close: Callable[[], None] | None = None
        md = session.md
        if any(not 0 <= t < md.vocab_size for t in prompt):
            raise InvalidRequestError("the prompt has token ids outside the vocabulary")
        if settings.kv_type is not KVType.F16 or (settings.kv_layout is KVLayout.UNIFIED and k > 1):
            raise InvalidRequestError(
                "the ONNX backend keeps one float cache per candidate: no kv_type or unified layout"
            )
        tm.kv_layout, tm.kv_type = KVLayout.STREAMS.value, "f32"  # each row attends over its own
        self.session, self.md, self.tok = session, md, tok
        self.eog = frozenset(md.eog_token_ids)
        self.scoring, self.keep = scoring, settings.keep_features
        self.feature_width = md.hidden_size
        self.cache: KVCache | None = None
        self.capacity = k
        self.kept: PromptPass | None = None  # the prompt's pass, for later waves
        self.waves = settings.max_candidates is not None
        self.rows = [0]
        self.last_logits: list[np.ndarray] = []
        self.step_logits: list[float | None] = []
        self.features: list[np.ndarray | None] = []

    def prefill(self, prompt: list[int], wanted: set[int]) -> Prefilled:
        """The prompt as one row; the step scores (and features) at its step boundaries."""
        pre = prompt_pass(
            self.session, self.md, prompt, wanted, sprm=self.scoring, features=self.keep
        )
        last = len(prompt) - 1
        self.cache = pre.cache
        self.kept = pre if self.waves else None
        self.last_logits = [pre.logits] * self.capacity
        self.step_logits = [pre.step_logits.get(last)] * self.capacity
        self.features = [pre.features.get(last)] * self.capacity
        scores = {}
        if self.scoring:
            order = sorted(p for p in pre.step_logits if p in wanted)
            values = sigmoid([pre.step_logits[p] for p in order])
            scores = dict(zip(order, (float(v) for v in values), strict=True))
        return Prefilled(scores, {p: f for p, f in pre.features.items() if p in wanted})

    def fork(self, first: int, n: int) -> None:
        """The prompt's cache repeated to n rows, slots first..first+n-1. A later wave starts when
        every earlier row has ended: its rows replace theirs, and its slots still hold the
        prompt's last logits, step logit and feature from `prefill`."""
        self.cache = (self.cache if first == 0 else self.kept.cache).repeat(n)
        self.rows = list(range(first, first + n))

    def sampler(self, sampling: SamplingSettings, candidate: int) -> NumpySampler:
        """A numpy sampler in llama.cpp's chain order for one candidate."""
        return NumpySampler(sampling, candidate, self.md.vocab_size)

    def sample(self, slot: int, sampler: NumpySampler) -> int:
        """Draw from `slot`'s last logits."""
        return sampler.sample(self.last_logits[slot])

    def logits(self, slot: int) -> np.ndarray:
        """`slot`'s last logits."""
        return self.last_logits[slot]

    def feature(self, slot: int) -> np.ndarray | None:
        """`slot`'s last feature (only when features are kept)."""
        return self.features[slot]

    def step_score(self, slot: int) -> float | None:
        """sigmoid of the graph's step logit on `slot`'s last token."""
        z = self.step_logits[slot]
        return None if z is None else float(sigmoid(z))

    def decode(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """Drop ended rows from the cache, then run the live rows' new tokens as one batch."""
        slots = [slot for slot, _, _ in rows]
        if slots != self.rows:
            where = {slot: r for r, slot in enumerate(self.rows)}
            self.cache = self.cache.take([where[slot] for slot in slots])
            self.rows = slots
        ids = np.asarray([[tok] for _, tok, _ in rows], dtype=np.int64)
        out = self.session.forward(ids, self.cache, sprm=self.scoring, features=self.keep)
        self.cache = out.cache
        for r, slot in enumerate(slots):
            self.last_logits[slot] = out.logits[r, -1]
            sprm = out.sprm_logits
            self.step_logits[slot] = float(sprm[r, -1]) if sprm is not None else None
            self.features[slot] = out.features[r, -1] if out.features is not None else None

    def free(self, slot: int) -> None:
        """Nothing now: the row leaves the cache at the next decode."""

    def token_bytes(self, token: int) -> bytes:
        """The token's bytes, as the tokenizer writes it."""
        return self.tok.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        """True for the turn-ending ids recorded at export."""
        return token in self.eog

    def close(self) -> None:
        """Drop the cache (and let the next generation run: `on_close`)."""
        self.cache = None
        done, self.on_close = self.on_close, None
        if done is not None:
            done()
