"""Per-candidate samplers in numpy, in the order of the llama.cpp chain the GGUF engine builds
(`engine/sampling.py`): logit bias -> repetition penalty -> (greedy) -> top-k -> top-p -> min-p ->
temperature -> draw.

The one difference: the draw. llama.cpp's `dist` sampler uses its own RNG (mt19937 seeded with
`candidate_seed`); this one uses numpy's PCG64 seeded with the same value. A candidate's tokens are
still a function of (seed, candidate index) only, never of which candidates share the batch, but the
same seed does not give the same tokens on both runtimes (nor could it: the logits differ in the
last bits anyway).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import numpy as np

from edge_metastone.errors import InvalidRequestError
from edge_metastone.types import SamplingSettings

_TOP_P_PEEK = 128  # candidates sorted first; the full vocabulary only if they hold < top_p mass


class NumpySampler:
    """One candidate's sampler: its settings, its token history and its own RNG stream."""

    def __init__(self, settings: SamplingSettings, candidate: int, n_vocab: int) -> None:
        self.s = settings
        for tok, _ in settings.logit_bias:
            if not 0 <= tok < n_vocab:
                raise InvalidRequestError(f"logit_bias token {tok} is outside the vocabulary")
        self._bias_ids = np.asarray([t for t, _ in settings.logit_bias], dtype=np.int64)
        self._bias = np.asarray([b for _, b in settings.logit_bias], dtype=np.float32)
        self._penalize = settings.repeat_penalty != 1.0 and settings.repeat_last_n > 0
        self._history: collections.deque[int] = collections.deque(
            maxlen=max(settings.repeat_last_n, 1)
        )
        self._rng = np.random.Generator(np.random.PCG64(settings.candidate_seed(candidate)))

    def accept_all(self, tokens: Iterable[int]) -> None:
        """Feed history (the prompt) to the repetition penalty."""
        if self._penalize:
            self._history.extend(tokens)

    def close(self) -> None:
        """Nothing to free (numpy's RNG is garbage-collected)."""

    def sample(self, logits: np.ndarray) -> int:
        """Draw one token from raw logits [n_vocab] (and remember it)."""
        s = self.s
        z = np.array(logits, dtype=np.float32)
        if len(self._bias_ids):
            np.add.at(z, self._bias_ids, self._bias)
        if self._penalize and self._history:
            seen = np.fromiter(set(self._history), dtype=np.int64)
            v = z[seen]
            z[seen] = np.where(v <= 0, v * s.repeat_penalty, v / s.repeat_penalty)
        tok = int(np.argmax(z)) if s.greedy else self._draw(z)
        if self._penalize:
            self._history.append(tok)
        return tok

    def _draw(self, z: np.ndarray) -> int:
        s = self.s
        ids = np.arange(len(z))
        if s.top_k > 0 and s.top_k < len(z):
            keep = np.argpartition(-z, s.top_k - 1)[: s.top_k]
            ids, z = keep, z[keep]
        if s.top_p < 1.0:
            ids, z = _top_p(ids, z, s.top_p)
        if s.min_p > 0.0:
            keep = z >= z.max() + np.log(s.min_p)
            ids, z = ids[keep], z[keep]
        z = z.astype(np.float64) / s.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(ids[self._rng.choice(len(p), p=p)])


def _top_p(ids: np.ndarray, z: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest prefix of the candidates, sorted by logit, whose probability reaches top_p
    (at least one), as llama.cpp's top-p: probabilities before temperature."""
    zf = z.astype(np.float64)
    m = zf.max()
    total = np.exp(zf - m).sum()
    peek = min(_TOP_P_PEEK, len(z))
    order = np.argpartition(-zf, peek - 1)[:peek] if peek < len(z) else np.arange(len(z))
    order = order[np.argsort(-zf[order], kind="stable")]
    cum = np.cumsum(np.exp(zf[order] - m)) / total
    if cum[-1] < top_p and peek < len(z):  # the head holds too little mass: sort everything
        order = np.argsort(-zf, kind="stable")
        cum = np.cumsum(np.exp(zf[order] - m)) / total
    n = int(np.searchsorted(cum, top_p) + 1)
    order = order[: min(n, len(order))]
    return ids[order], z[order]
