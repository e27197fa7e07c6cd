"""Fit the combined selector (`search.combined.Selector`) from final-answer labels, and measure
every selector on the same problems to name the model's best one (`metastone.default_strategy`).

The head is trained on the training problems; the combination is fitted on the validation
problems (head scores on problems the head never saw), an L2-regularised logistic regression of
each candidate's correctness on its `FEATURES`. Its numbers are cross-fitted: the validation
problems are split into folds (a problem never straddles two), each fold is scored by a fit on the
others, and the AUCs and accuracies are of those out-of-fold scores. The recorded weights are one
fit on all the validation problems.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_metastone.search.base import StrategyName
from edge_metastone.search.combined import FEATURES, Selector, feature_values
from edge_metastone.search.confidence import DEFAULT_WINDOW
from edge_metastone.search.vote import vote
from edge_metastone.sprm import sigmoid
from edge_metastone.training.metrics import CHOOSERS, ProblemSamples, by_value, within_auc

FOLDS = 5
L2 = 1.0  # on standardised features
# the strategies measured, in order of preference on ties
MEASURED = (
    StrategyName.VOTE,
    StrategyName.LOGPROB,
    StrategyName.BEST_OF_K,
    StrategyName.WEIGHTED_VOTE,
    StrategyName.COMBINED,
    StrategyName.COMBINED_VOTE,
)


def feature_matrix(p: ProblemSamples, window: int) -> np.ndarray:
    """[k, len(FEATURES)]: each candidate's features."""
    lps = p.token_logprobs or [[v] for v in p.mean_logprob]
    rows = [feature_values(s, lp, window) for s, lp in zip(p.step_scores, lps, strict=True)]
    return np.array([[r[f] for f in FEATURES] for r in rows], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """(weights, bias) in `x`'s own units minimising the log-loss plus l2/2 |w|^2 on standardised
    features (Newton's method; labels all alike only move the bias)."""
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd < 1e-9] = 1.0
    xs = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    w = np.zeros(xs.shape[1])
    reg = np.full(xs.shape[1], l2)
    reg[-1] = 1e-6  # the bias: barely held, so one-class data stays finite
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ w, -30, 30)))
        grad = xs.T @ (p - y) + reg * w
        hess = (xs * (p * (1 - p))[:, None]).T @ xs + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = w[:-1] / sd
    return weights, float(w[-1] - (weights * mu).sum())


def fit_on(problems: Sequence[ProblemSamples], window: int) -> Selector:
    """One fit on `problems` (truncated candidates, never right, count as wrong)."""
    x = np.vstack([feature_matrix(p, window) for p in problems])
    y = np.array([float(c) for p in problems for c in p.correct])
    w, b = fit_logistic(x, y)
    return Selector(dict(zip(FEATURES, (float(v) for v in w), strict=True)), b, window)


def folds_of(n: int, folds: int, seed: int) -> list[list[int]]:
    """Problem indices in `folds` groups (a seeded shuffle)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[f::folds] for f in range(folds)]


def out_of_fold(
    problems: Sequence[ProblemSamples], window: int, folds: int, seed: int
) -> list[np.ndarray]:
    """Each problem's candidates' z from a fit on the other folds (one fit on all: in-sample,
    when there are fewer than two problems)."""
    n = len(problems)
    if n < 2:
        sel = fit_on(problems, window)
        return [_z(sel, p) for p in problems]
    out: list[np.ndarray] = [np.empty(0)] * n
    for fold in folds_of(n, min(folds, n), seed):
        rest = [problems[i] for i in range(n) if i not in set(fold)]
        sel = fit_on(rest, window)
        for i in fold:
            out[i] = _z(sel, problems[i])
    return out


def _z(sel: Selector, p: ProblemSamples) -> np.ndarray:
    x = feature_matrix(p, sel.window)
    return np.array([sel.logit_of(dict(zip(FEATURES, row, strict=True))) for row in x])


def accuracies(problems: Sequence[ProblemSamples], z: Sequence[np.ndarray]) -> dict[str, float]:
    """Each measured strategy's accuracy (by its name), the expected one-sample accuracy and the
    oracle's, with `z` the combined score of each problem's candidates."""
    picks: dict[StrategyName, list[bool]] = {name: [] for name in MEASURED}
    for p, zp in zip(problems, z, strict=True):
        idx = list(range(len(p.correct)))
        chosen = {name: choose(p) for name, choose in CHOOSERS.items()}
        chosen[StrategyName.COMBINED] = by_value(zp)
        chosen[StrategyName.COMBINED_VOTE] = vote(p.answers, [float(v) for v in sigmoid(zp)], idx)
        for name in MEASURED:
            picks[name].append(p.correct[chosen[name]])
    out = {"one_sample": float(np.mean([np.mean(p.correct) for p in problems]))}
    out.update({name.value: float(np.mean(v)) for name, v in picks.items()})
    out["oracle"] = float(np.mean([any(p.correct) for p in problems]))
    return out


def best_strategy(acc: dict[str, float]) -> StrategyName:
    """The most accurate measured strategy (ties: the earlier in `MEASURED`)."""
    return max(MEASURED, key=lambda name: (acc[name.value], -MEASURED.index(name)))


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def fit_selector(
    problems: Sequence[ProblemSamples],
    *,
    window: int = DEFAULT_WINDOW,
    folds: int = FOLDS,
    seed: int = 0,
    in_sample: bool = False,
) -> tuple[Selector, StrategyName]:
    """The selector fitted on `problems`, its cross-fitted numbers in `measured`, and the best
    measured strategy. `in_sample`: the problems are the head's training ones (no held-out)."""
    z = out_of_fold(problems, window, folds, seed)
    labels = [[float(c) for c in p.correct] for p in problems]
    acc = accuracies(problems, z)
    best = best_strategy(acc)
    measured: dict[str, Any] = {
        "problems": len(problems),
        "candidates": sum(len(p.correct) for p in problems),
        "folds": min(folds, len(problems)) if len(problems) >= 2 else 1,
        "validation_is_training_set": in_sample,
        "auc_within": {
            "head": _round(within_auc([p.score for p in problems], labels)[0]),
            "logprob": _round(within_auc([p.mean_logprob for p in problems], labels)[0]),
            "combined": _round(within_auc([list(v) for v in z], labels)[0]),
        },
        "accuracy": {name: round(v, 4) for name, v in acc.items()},
        "default_strategy": best.value,
    }
    sel = fit_on(problems, window)
    return Selector(sel.weights, sel.bias, window, measured), best
