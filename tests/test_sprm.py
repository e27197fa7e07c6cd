"""The package's SPRM rule and head math against exact hand-built cases and the reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from edge_metastone.sprm import SprmHead, StepRule, trajectory_score
from reference_scorer import head_scores, make_head, scored_positions

D, S, E = 9, 7, 8  # delimiter, <think>, </think>
RULE = StepRule.of([D], S, E)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([1, 2, D, 3, D, D, 4, D], [1, 3, 6]),  # runs count once, at their first delimiter
        ([D, 1, D], [1]),  # j=0 has no feature before it; i=0 is below start+1
        ([1, S, D, 2, D, E, 3, D], [3]),  # after <think> is skipped; after </think> is outside
        ([1, S, 2, D, S, 3, D], [2, 5]),  # two <think>: start falls back to 0
        ([S, 1, D, 2, E, D, E], [1, 4]),  # two </think>: end falls back to len
        ([S, 1, D, 2, D], [1, 3]),  # no </think>: end is len
        ([S, 1, E, D], []),  # i = end is not < end
        ([1, 2, 3], []),
        ([], []),
    ],
)
def test_scored_positions_exact(ids, expected):
    assert RULE.scored_positions(ids) == expected


def test_scored_positions_agree_with_reference_on_random_sequences():
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.choice([1, 2, 3, D, D, S, E]) for _ in range(rng.randint(0, 30))]
        assert RULE.scored_positions(ids) == scored_positions(ids, [D], S, E), ids


def test_trajectory_score():
    assert trajectory_score([]) == 0.0
    assert trajectory_score([0.25, 1.0]) == pytest.approx(0.5)
    assert trajectory_score([0.0, 1.0]) == pytest.approx(math.sqrt(1e-10))
    assert trajectory_score([0.9]) == pytest.approx(0.9)


def test_head_math_matches_torch_reference():
    torch.manual_seed(0)
    head = make_head(16).eval()
    sd = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    ours = SprmHead(sd["0.weight"], sd["0.bias"], sd["3.weight"].reshape(-1), sd["3.bias"], 3)
    feats = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32) * 3
    diff = np.abs(ours.scores(feats) - np.asarray(head_scores(head, feats))).max()
    assert diff < 1e-6, f"max |score diff| {diff:.2e}"


def test_head_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2C"):
        SprmHead(np.zeros((8, 8)), np.zeros(8), np.zeros(8), np.zeros(1), 0)
