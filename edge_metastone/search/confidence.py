"""The policy's own confidence in a candidate, and confidence-weighted voting (DeepConf, offline):
answers weighted by their candidates' confidence, after dropping the least confident share.

Confidence comes from the token log-probabilities the decode loop records (`settings.logprobs`):
the mean over the candidate, the lowest mean over a sliding window of tokens (DeepConf's "lowest
group confidence", the signal of its online termination), or the mean over the last window.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_metastone.answers import extract_answer
from edge_metastone.backend import Backend
from edge_metastone.errors import InvalidRequestError
from edge_metastone.search.base import StrategyName, finished_well, selection_pool
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.search.vote import vote
from edge_metastone.types import Candidate, GenerationSettings

DEFAULT_WINDOW = 16  # tokens in a confidence window (about two of MetaStone-nano's steps)


class Signal(str, enum.Enum):
    """Which confidence of a candidate (all in log-probability units: 0 is certain)."""

    MEAN = "mean"  # mean token log-probability
    LOWEST = "lowest"  # lowest mean over a sliding window of tokens
    TAIL = "tail"  # mean over the last window


def window_means(logprobs: Sequence[float], window: int) -> np.ndarray:
    """Mean log-probability of every run of `window` consecutive tokens (of all of them when
    fewer): the running confidence the decode loop checks, token by token."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if len(lp) <= window:
        return np.asarray([lp.mean()]) if len(lp) else np.empty(0)
    c = np.concatenate([[0.0], np.cumsum(lp)])
    return (c[window:] - c[:-window]) / window


def confidence(c: Candidate, signal: Signal = Signal.MEAN, window: int = DEFAULT_WINDOW) -> float:
    """The candidate's confidence by `signal`; -inf when it scored no token."""
    lp = c.token_logprobs
    if lp is None or not lp:
        return c.mean_logprob if c.mean_logprob is not None else -math.inf
    if signal is Signal.MEAN:
        return float(np.mean(lp))
    if signal is Signal.TAIL:
        return float(np.mean(lp[-window:]))
    return float(window_means(lp, window).min())


@dataclass(frozen=True)
class VoteRule:
    """Confidence-weighted vote: keep the `keep` most confident share of the candidates that
    finished well, weight each by exp(sharpness x confidence), and take the heaviest answer."""

    signal: Signal = Signal.MEAN
    window: int = DEFAULT_WINDOW
    keep: float = 1.0
    sharpness: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "signal", Signal(self.signal))
        if not 0 < self.keep <= 1:
            raise InvalidRequestError("keep must be in (0, 1]", param="keep")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise InvalidRequestError("window must be an integer >= 1", param="window")
        if not (math.isfinite(self.sharpness) and self.sharpness >= 0):
            raise InvalidRequestError("sharpness must be finite and >= 0", param="sharpness")

    def pool(self, cands: Sequence[Candidate]) -> tuple[list[Candidate], list[float]]:
        """The candidates that vote and their weights."""
        pool = selection_pool(cands)
        pool = [c for c in pool if finished_well(c)] or pool
        conf = [confidence(c, self.signal, self.window) for c in pool]
        if self.keep < 1:
            n = max(1, math.ceil(self.keep * len(pool)))
            order = sorted(range(len(pool)), key=lambda i: (-conf[i], pool[i].index))[:n]
            pool, conf = [pool[i] for i in sorted(order)], [conf[i] for i in sorted(order)]
        top = max(conf, default=0.0)
        top = top if math.isfinite(top) else 0.0
        return pool, [
            math.exp(self.sharpness * (v - top)) if math.isfinite(v) else 0.0 for v in conf
        ]

    def tally(self, cands: Sequence[Candidate]) -> dict[str, float]:
        """Each answer's share of the vote's weight (answers as written, equal texts merged)."""
        pool, weights = self.pool(cands)
        total = sum(weights) or 1.0
        shares: dict[str, float] = {}
        for c, w in zip(pool, weights, strict=True):
            a = extract_answer(c.text).strip()
            shares[a] = shares.get(a, 0.0) + w / total
        return shares

    def choose(self, cands: Sequence[Candidate]) -> int:
        """The chosen candidate's `.index`."""
        pool, weights = self.pool(cands)
        return vote([extract_answer(c.text) for c in pool], weights, [c.index for c in pool])


class ConfidenceVote(SelectingStrategy):
    """Answers weighted by their candidates' confidence (offline DeepConf)."""

    name = StrategyName.CONFIDENCE_VOTE

    def __init__(self, rule: VoteRule | None = None) -> None:
        self.rule = rule or VoteRule()

    def prepare(self, backend: Backend, settings: GenerationSettings) -> GenerationSettings:
        """Ask the backend for log-probabilities."""
        return dataclasses.replace(settings, logprobs=True)

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """The heaviest answer's most confident candidate."""
        r = self.rule
        kept = f"the {r.keep:.0%} most confident of " if r.keep < 1 else ""
        return r.choose(cands), f"confidence-weighted vote ({r.signal.value}) over {kept}{k}"
