"""Train an SPRM head on collected samples (torch, CPU) and report how it chooses.

The head is SPEC §1's `Linear(C, 2C) -> ReLU -> Dropout(0.5) -> Linear(2C, 1)`. Training sees
the steps of the training split's untruncated candidates, each labelled with its candidate's
final-answer correctness (SPEC §1: truncated candidates are left out of the loss; in the report they
count as wrong). The report scores the validation split with the runtime's own head math.

The head trains on standardised features ((x - mean) / std per dimension, over the training
steps) and the scaling is folded into fc1 afterwards, so the head written is SPEC §1's on raw
features, the same function. A real model's residual stream has a few dimensions hundreds of
times larger than the rest (SmolLM2's layer L-2: one near 574, row norms near 660); on raw
features the initial logits are large, and the SPR loss's sign filter then keeps only the steps
that agree with them and saturates every score at 1 (final loss 0).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_metastone.errors import InvalidRequestError
from edge_metastone.sprm import SprmHead, trajectory_score
from edge_metastone.training.collect import ProblemData
from edge_metastone.training.loss import LOSSES, Loss
from edge_metastone.training.metrics import ProblemSamples, auc_report, selection_report

logger = logging.getLogger(__name__)


FORMS = ("mlp", "linear", "auto")  # auto: train-sprm fits both and keeps the better (pipeline)
# measured on SmolLM2-135M a+b+c problems, 4 folds that hold out whole answer values: within-problem
# AUC 0.747 at 1, 0.760 at 30, 0.744 at 300; the MLP 0.729 (bench/head_forms.py; results/)
DEFAULT_L2 = 30.0


@dataclass(frozen=True)
class TrainSettings:
    """The head's optimisation."""

    loss: Loss = Loss.SPR
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    val_split: float = 0.2
    seed: int = 0
    form: str = "mlp"  # "mlp": SPEC §1's head trained by `loss`; "linear": see train_linear; "auto"
    l2: float = DEFAULT_L2  # the linear form's L2 strength on standardised features

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "loss", Loss(self.loss))
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        if self.form not in FORMS:
            raise InvalidRequestError(f"the head's form must be one of {', '.join(FORMS)}")
        if self.form == "linear" and self.loss is not Loss.BCE:
            raise InvalidRequestError("a linear head is a logistic regression: use --loss bce")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidRequestError("epochs and batch size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidRequestError("the learning rate must be a finite number > 0")
        if not (self.l2 > 0 and math.isfinite(self.l2)):
            raise InvalidRequestError("l2 must be a finite number > 0")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise InvalidRequestError("the weight decay must be a finite number >= 0")
        if not 0 <= self.val_split < 1:
            raise InvalidRequestError("the validation split must be in [0, 1)")


MIN_ANSWER_GROUPS = 5  # fewer distinct answers than this: validation problems are drawn one by one


def answer_key(answer: str) -> str:
    """A gold answer's identity for grouping: numbers by value (`9`, `9.0` and ` 9 ` are one),
    other text without whitespace and case."""
    text = "".join(str(answer).split()).lower()
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return text
    return repr(value) if math.isfinite(value) else text


def split(
    problems: Sequence[tuple[str, str]], val_split: float, seed: int
) -> tuple[set[str], set[str], str]:
    """(train keys, validation keys, how) for (key, gold answer) pairs. Validation takes whole
    answer values (`how` = "answer"): no validation problem's answer is right in training, so the
    numbers it measures are not inflated by a head that learned which values tend to be right (on a
    small answer space it does). With fewer than MIN_ANSWER_GROUPS distinct answers, problems are
    drawn one by one (`how` = "problem"). A seeded shuffle; at least one problem on each side when
    val_split > 0 and there are two or more problems."""
    keys = sorted({k for k, _ in problems})
    n_val = round(len(keys) * val_split)
    if val_split > 0 and len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    if n_val == 0:
        return set(keys), set(), "none"
    by_answer: dict[str, set[str]] = {}
    for k, a in problems:
        by_answer.setdefault(answer_key(a), set()).add(k)
    groups = [sorted(by_answer[a]) for a in sorted(by_answer)]
    random.Random(seed).shuffle(groups)
    if len(groups) >= MIN_ANSWER_GROUPS:
        val: set[str] = set()
        for g in groups:
            if len(val) >= n_val:
                break
            val.update(g)
        if len(val) < len(keys):
            return set(keys) - val, val, "answer"
    order = list(keys)
    random.Random(seed).shuffle(order)
    return set(order[n_val:]), set(order[:n_val]), "problem"


def training_steps(data: Sequence[ProblemData]) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, C] and labels [N] of every step of every untruncated candidate."""
    xs, ys = [], []
    for d in data:
        for feats, ok, cut in zip(d.candidate_features(), d.correct, d.truncated, strict=True):
            if cut or len(feats) == 0:
                continue
            xs.append(feats)
            ys.append(np.full(len(feats), 1.0 if ok else 0.0, dtype=np.float32))
    if not xs:
        return np.empty((0, 0), np.float32), np.empty(0, np.float32)
    return np.concatenate(xs), np.concatenate(ys)


def head_arrays(head) -> tuple[np.ndarray, ...]:
    """(fc1.weight, fc1.bias, fc2.weight [2C], fc2.bias [1]) of a torch head, float32."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in head.state_dict().items()}
    return sd["0.weight"], sd["0.bias"], sd["3.weight"].reshape(-1), sd["3.bias"].reshape(1)


@dataclass
class TrainLog:
    """Loss per epoch and how many steps the sign filter kept."""

    losses: list[float] = field(default_factory=list)
    kept_fraction: list[float] = field(default_factory=list)


def feature_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation of features [N, C] (a constant dimension: 1)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    return x.mean(axis=0), np.where(sd > 1e-6, sd, 1.0)


def fold_scale(
    w1: np.ndarray, b1: np.ndarray, mu: np.ndarray, sd: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """fc1 on standardised features -> the same fc1 on raw ones: W/sd, b - (W/sd) mu."""
    w = w1.astype(np.float64) / sd[None, :]
    return w.astype(np.float32), (b1 - w @ mu).astype(np.float32)


def _torch_head(c: int, init: SprmHead | None, mu: np.ndarray, sd: np.ndarray):
    """SPEC §1's head for standardised features; `init` (on raw ones) converted into it."""
    import torch
    from torch import nn

    head = nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * c, 1))
    if init is not None:
        w1 = init.fc1_weight.astype(np.float64)
        with torch.no_grad():
            head[0].weight.copy_(torch.from_numpy((w1 * sd[None, :]).astype(np.float32)))
            head[0].bias.copy_(torch.from_numpy((init.fc1_bias + w1 @ mu).astype(np.float32)))
            head[3].weight.copy_(torch.from_numpy(init.fc2_weight.astype(np.float32))[None, :])
            head[3].bias.copy_(torch.from_numpy(init.fc2_bias.astype(np.float32)))
    return head


def linear_head(w: np.ndarray, b: float, feature_layer: int) -> SprmHead:
    """SPEC §1's head computing exactly the linear logit w.x + b: relu(z) - relu(-z) = z, so fc1's
    first two rows are (w, b) and (-w, -b), fc2 is (1, -1), everything else zero."""
    c = len(w)
    w1 = np.zeros((2 * c, c), np.float32)
    b1 = np.zeros(2 * c, np.float32)
    w2 = np.zeros(2 * c, np.float32)
    w1[0], w1[1] = w, -w
    b1[0], b1[1] = b, -b
    w2[0], w2[1] = 1.0, -1.0
    return SprmHead(w1, b1, w2, np.zeros(1, np.float32), feature_layer=feature_layer)


def train_linear(
    x: np.ndarray, y: np.ndarray, settings: TrainSettings, *, feature_layer: int
) -> tuple[SprmHead, TrainLog]:
    """The linear form: an L2-regularised logistic regression of each step's label on its
    feature (outcome BCE, fitted exactly by Newton's method on standardised features), written as
    SPEC §1's head. Fewer parameters than the MLP: on a small answer space it learns less of which
    answer values tend to be right, and holds up better on answers it never saw (DEFAULT_L2)."""
    from edge_metastone.training.selector_fit import fit_logistic

    x64 = np.asarray(x, np.float64)
    w, b = fit_logistic(x64, np.asarray(y, np.float64), settings.l2)
    z = x64 @ w + b
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    kept = float(np.mean((z > 0) == (y > 0.5)))
    return linear_head(w, b, feature_layer), TrainLog([loss], [kept])


def train_head(
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    feature_layer: int,
    init: SprmHead | None = None,
) -> tuple[SprmHead, TrainLog]:
    """Fit the head on steps (x, y) with the chosen loss; `init` warm-starts it (the MLP)."""
    if settings.form == "auto":
        raise InvalidRequestError("form 'auto' is train-sprm's choice between the forms")
    if len(x) == 0:
        raise InvalidRequestError("no training steps: no untruncated candidate had a scored step")
    if settings.form == "linear":
        return train_linear(x, y, settings, feature_layer=feature_layer)
    import torch

    torch.manual_seed(settings.seed)
    mu, sd = feature_scale(x)
    head = _torch_head(x.shape[1], init, mu, sd)
    loss_fn = LOSSES[settings.loss]
    opt = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    xs = ((np.asarray(x, np.float64) - mu) / sd).astype(np.float32)
    xt, yt = torch.from_numpy(xs), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(settings.seed)
    log = TrainLog()
    head.train()
    for _ in range(settings.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total, kept, seen = 0.0, 0, 0
        for start in range(0, len(xt), settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            logits = head(xt[idx])[:, 0]
            loss = loss_fn(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            with torch.no_grad():
                kept += int(
                    (((logits > 0) & (yt[idx] == 1)) | ((logits < 0) & (yt[idx] == 0))).sum()
                )
            seen += len(idx)
        log.losses.append(total / seen)
        log.kept_fraction.append(kept / seen)
    head.eval()
    w1, b1, w2, b2 = head_arrays(head)
    w1, b1 = fold_scale(w1, b1, mu, sd)
    return SprmHead(w1, b1, w2, b2, feature_layer=feature_layer, dtype="f32"), log


def samples_for(data: Sequence[ProblemData], head: SprmHead | None) -> list[ProblemSamples]:
    """The report's view of problems, scored by `head` with the runtime's own head math."""
    out = []
    for d in data:
        per_cand = d.candidate_features()
        lps = [[float(v) for v in lp] for lp in d.candidate_logprobs()]
        step_scores = [
            [float(s) for s in head.scores(f)] if head is not None and len(f) else []
            for f in per_cand
        ]
        out.append(
            ProblemSamples(
                answers=list(d.answers),
                correct=[bool(c) for c in d.correct],
                score=[trajectory_score(s) for s in step_scores],
                mean_logprob=[float(v) for v in d.mean_logprob],
                step_scores=step_scores,
                token_logprobs=lps,
            )
        )
    return out


def report(data: Sequence[ProblemData], head: SprmHead | None) -> dict[str, object]:
    """AUCs and best-of-k accuracies of `head` on `data` (one problem = one group of k)."""
    samples = samples_for(data, head)
    k = len(data[0].correct) if data else 0
    return {
        "problems": len(data),
        "k": k,
        "candidates": int(sum(len(d.correct) for d in data)),
        "truncated": int(sum(int(d.truncated.sum()) for d in data)),
        "accuracy": float(np.mean([c for d in data for c in d.correct])) if data else None,
        **auc_report(samples),
        "best_of_k": selection_report(samples),
    }
