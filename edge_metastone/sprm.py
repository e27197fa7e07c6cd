"""The self-supervised process reward model: head math, which positions are scored, aggregation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SCORE_FLOOR = 1e-10
STEP_DELIMITER = ".\n\n"
THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class SprmHead:
    """`Linear(C, 2C) -> ReLU -> Linear(2C, 1)` (dropout is off at inference); weights as stored."""

    fc1_weight: np.ndarray  # [2C, C]
    fc1_bias: np.ndarray  # [2C]
    fc2_weight: np.ndarray  # [2C]
    fc2_bias: np.ndarray  # [1]
    feature_layer: int
    dtype: str = "f32"

    def __post_init__(self) -> None:
        inner, c = self.fc1_weight.shape
        if inner != 2 * c:
            raise ValueError(f"fc1 weight is [{inner}, {c}], expected [2C, C]")
        if self.fc1_bias.shape != (inner,) or self.fc2_weight.shape != (inner,):
            raise ValueError("fc1 bias and fc2 weight must have 2C values")
        if self.fc2_bias.shape != (1,):
            raise ValueError("fc2 bias must have one value")

    @property
    def hidden_size(self) -> int:
        """C, the backbone's hidden size."""
        return int(self.fc1_weight.shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Head logits for features [N, C] -> [N], computed in float32."""
        # einsum, not matmul: matmul hands this to a multi-threaded BLAS whose threads fight
        # llama.cpp's busy-waiting decode threads for the cores (measured: 15 ms per call instead
        # of 0.2 ms, and every decode after it slowed down); einsum runs on this thread only
        x = np.asarray(features, dtype=np.float32)
        h = np.einsum("ic,nc->ni", self.fc1_weight.astype(np.float32, copy=False), x)
        h += self.fc1_bias.astype(np.float32, copy=False)
        np.maximum(h, 0.0, out=h)
        w2 = self.fc2_weight.astype(np.float32, copy=False)
        return np.einsum("i,ni->n", w2, h) + np.float32(self.fc2_bias[0])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Step scores sigmoid(logit) for features [N, C] -> [N]."""
        return sigmoid(self.logits(features))


def sigmoid(z: np.ndarray | Sequence[float] | float) -> np.ndarray:
    """Step scores from step logits, in float64 without overflow for large |z| (NaN logits give
    NaN scores: callers refuse them)."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.exp(-np.logaddexp(0.0, -z))


@dataclass(frozen=True)
class StepRule:
    """The token facts that decide which positions are scored (SPEC §1)."""

    step_token_ids: frozenset[int]
    think_start_id: int = -1
    think_end_id: int = -1

    @property
    def thinks(self) -> bool:
        """The vocabulary has both think tags: the model thinks inside `<think> ... </think>`."""
        return self.think_start_id >= 0 and self.think_end_id >= 0

    @classmethod
    def of(cls, step_ids: Sequence[int], think_start: int, think_end: int) -> StepRule:
        """Build a rule from the ids stored in a model file."""
        return cls(frozenset(int(t) for t in step_ids), int(think_start), int(think_end))

    def is_step_boundary(self, prev: int, token: int) -> bool:
        """True when `token` is the first delimiter of a run and does not follow `<think>`."""
        return (
            token in self.step_token_ids
            and prev not in self.step_token_ids
            and prev != self.think_start_id
        )

    def scored_positions(self, token_ids: Sequence[int]) -> list[int]:
        """Indices i of the features that are scored in a full token sequence."""
        ids = list(token_ids)
        n = len(ids)
        starts = [k for k, t in enumerate(ids) if t == self.think_start_id]
        ends = [k for k, t in enumerate(ids) if t == self.think_end_id]
        start = starts[0] if len(starts) == 1 else 0
        end = ends[0] if len(ends) == 1 else n
        return [
            j - 1
            for j in range(1, n)
            if self.is_step_boundary(ids[j - 1], ids[j]) and start + 1 <= j - 1 <= end - 1
        ]


def line_delimiters(token_texts: Iterable[tuple[int, str]]) -> list[int]:
    """The ids of every token that ends a line: its text holds a newline and, whitespace aside,
    at most one other character (`\\n`, `\\n\\n`, `\\r\\n`, `.\\n`, `\\n   `), as the reference's
    line mode counts them (SPEC §1). The delimiters of a model that writes one step per line."""
    return [t for t, text in token_texts if "\n" in text and len(text.strip()) <= 1]


def trajectory_score(step_scores: Sequence[float]) -> float:
    """Geometric mean of step scores, each clamped to >= 1e-10; 0.0 when there is no step."""
    if len(step_scores) == 0:
        return 0.0
    return math.exp(
        sum(math.log(max(float(s), SCORE_FLOOR)) for s in step_scores) / len(step_scores)
    )
