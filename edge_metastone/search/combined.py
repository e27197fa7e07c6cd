"""Selection that uses both signals: a logistic combination of the SPRM head's step scores and the
policy's own token log-probabilities,

    z = bias + sum_f weight_f x feature_f        P(right) = sigmoid(z)

fitted by train-sprm from final-answer labels and recorded in the model (`metastone.selector`).
`combined` keeps the candidate with the highest z; `combined-vote` weighs each answer by its
candidates' P(right). The features (`FEATURES`) are over the steps the candidate wrote (a model
without a think window also scores its prompt's lines, SPEC §1; those are the same for every
candidate and are left out here) and over its generated tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_metastone.answers import extract_answer
from edge_metastone.backend import Backend
from edge_metastone.errors import InvalidRequestError
from edge_metastone.search.base import (
    StrategyName,
    argmax_lowest_index,
    finished_well,
    selection_pool,
)
from edge_metastone.search.confidence import DEFAULT_WINDOW, window_means
from edge_metastone.search.strategy import SelectingStrategy
from edge_metastone.search.vote import vote
from edge_metastone.sprm import sigmoid
from edge_metastone.types import Candidate, GenerationSettings, finite_number

logger = logging.getLogger(__name__)

SELECTOR_VERSION = 1
# What a candidate is described by (the names are the JSON's `weights` keys):
FEATURES = (
    "sprm_mean",  # mean log-odds of the head's step scores
    "sprm_min",  # lowest log-odds of a step (the weakest step)
    "logprob_mean",  # mean token log-probability
    "logprob_lowest",  # lowest mean log-probability over a window of tokens
)
LOGIT_CLIP = 10.0  # a step's log-odds, clipped; a candidate without a step gets -LOGIT_CLIP
LOGPROB_FLOOR = -20.0  # log-probabilities below this (or none at all) count as this


def step_logit(score: float) -> float:
    """A step score's log-odds, clipped to +-LOGIT_CLIP."""
    s = min(max(float(score), 1e-12), 1.0 - 1e-12)
    return min(max(math.log(s) - math.log1p(-s), -LOGIT_CLIP), LOGIT_CLIP)


def feature_values(
    step_scores: Sequence[float], token_logprobs: Sequence[float] | None, window: int
) -> dict[str, float]:
    """`FEATURES` of a candidate from its generated steps' scores and its tokens' log-probs."""
    logits = [step_logit(s) for s in step_scores]
    lp = np.asarray(token_logprobs if token_logprobs is not None else [], dtype=np.float64)
    lp = lp[np.isfinite(lp)]
    mean = float(lp.mean()) if len(lp) else LOGPROB_FLOOR
    lowest = float(window_means(lp, window).min()) if len(lp) else LOGPROB_FLOOR
    return {
        "sprm_mean": float(np.mean(logits)) if logits else -LOGIT_CLIP,
        "sprm_min": min(logits) if logits else -LOGIT_CLIP,
        "logprob_mean": max(mean, LOGPROB_FLOOR),
        "logprob_lowest": max(lowest, LOGPROB_FLOOR),
    }


def generated_step_scores(c: Candidate) -> list[float]:
    """The head's scores of the steps `c` wrote. With log-probabilities on, a step in the prompt
    is the one without a step confidence (`Candidate.step_confidence`); without them, all."""
    conf = c.step_confidence
    if len(conf) != len(c.step_scores):
        return list(c.step_scores)
    return [s for s, v in zip(c.step_scores, conf, strict=True) if v is not None]


def candidate_features(c: Candidate, window: int = DEFAULT_WINDOW) -> dict[str, float]:
    """`FEATURES` of a finished candidate."""
    lps = c.token_logprobs
    if lps is None and c.mean_logprob is not None:
        lps = [c.mean_logprob]
    return feature_values(generated_step_scores(c), lps, window)


@dataclass(frozen=True)
class Selector:
    """A fitted combination: weights per feature (absent: 0), bias, the log-probability window,
    and the validation numbers it was chosen by (`measured`, free-form, for people)."""

    weights: Mapping[str, float]
    bias: float = 0.0
    window: int = DEFAULT_WINDOW
    measured: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        w = dict(self.weights)
        unknown = sorted(set(w) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown selector features {unknown} (known: {', '.join(FEATURES)})")
        if not all(finite_number(v) for v in (*w.values(), self.bias)):
            raise ValueError("selector weights and bias must be finite numbers")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError("selector window must be an integer >= 1")
        object.__setattr__(self, "weights", {f: float(w.get(f, 0.0)) for f in FEATURES})

    def logit_of(self, features: Mapping[str, float]) -> float:
        """z for a candidate's features."""
        return self.bias + sum(self.weights[f] * features[f] for f in FEATURES)

    def logit(self, c: Candidate) -> float:
        """z for a finished candidate."""
        return self.logit_of(candidate_features(c, self.window))

    def probability(self, c: Candidate) -> float:
        """P(right) = sigmoid(z): the candidate's vote weight."""
        return float(sigmoid(self.logit(c)))

    def to_json(self) -> str:
        """The `metastone.selector` value."""
        d = {
            "version": SELECTOR_VERSION,
            "features": list(FEATURES),
            "weights": self.weights,
            "bias": self.bias,
            "window": self.window,
            "measured": self.measured,
        }
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Selector | None:
        """A model's recorded selector; None (with a warning when it is unreadable) without one."""
        if not text:
            return None
        try:
            d = json.loads(text)
            if d.get("version") != SELECTOR_VERSION:
                raise ValueError(f"version {d.get('version')!r} is not {SELECTOR_VERSION}")
            measured = dict(d.get("measured") or {})
            return cls(d["weights"], d.get("bias", 0.0), d.get("window", DEFAULT_WINDOW), measured)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("ignoring the model's recorded selector: %s", e)
            return None


class Combined(SelectingStrategy):
    """Best-of-k (or a vote) by the fitted combination of head and log-probability: the given
    selector, else the model's recorded one (`Backend.policy_keys`)."""

    def __init__(self, vote: bool = False, selector: Selector | None = None) -> None:
        self.vote = vote
        self.selector = selector
        self.name = StrategyName.COMBINED_VOTE if vote else StrategyName.COMBINED

    def resolve(self, backend: Backend | None) -> Selector:
        """The selector in use; an error naming the key when the model records none."""
        if self.selector is not None:
            return self.selector
        found = Selector.from_json(backend.policy_keys.selector if backend is not None else None)
        if found is None:
            raise InvalidRequestError(
                f"strategy {self.name.value!r} needs a fitted selector (metastone.selector), and "
                "this model records none: train one with `edge-metastone train-sprm`",
                param="strategy",
            )
        return found

    def prepare(self, backend: Backend, settings: GenerationSettings) -> GenerationSettings:
        """Check there is a selector before any token is generated; ask for log-probabilities."""
        self.selector = self.resolve(backend)
        return dataclasses.replace(settings, logprobs=True)

    def select(self, backend: Backend, cands: list[Candidate], k: int) -> tuple[int, str]:
        """Highest combined log-odds, or the answer with the most P(right); ties: lowest index."""
        sel = self.resolve(backend)
        pool = selection_pool(cands)
        pool = [c for c in pool if finished_well(c)] or pool
        z = [sel.logit(c) for c in pool]
        if self.vote:
            answers = [extract_answer(c.text) for c in pool]
            best = vote(answers, [float(p) for p in sigmoid(z)], [c.index for c in pool])
            return best, f"vote weighted by the combined head + log-probability score over {k}"
        best = argmax_lowest_index([(c.index, v) for c, v in zip(pool, z, strict=True)])
        return best, f"highest combined head + log-probability score of {k}"
