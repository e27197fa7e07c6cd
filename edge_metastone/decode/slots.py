"""What a runtime supplies to the decode loop: a few small operations on one generation's slots.

The loop (`edge_metastone.decode.loop`) owns everything else: the order of sampling, step detection
and scoring, prune, halt, stop strings, the answer budget, the events and the timings. A runtime's
`Slots` holds only its own state: the cache with one slot per candidate, each slot's last logits,
feature and step score, its samplers, and how it turns token ids into bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge_metastone.sprm import StepRule
from edge_metastone.types import GenerationControl, GenerationSettings, SamplingSettings, Timings


@dataclass
class Prefilled:
    """What the prompt's pass leaves for the loop: step scores (when scoring) and features (when
    kept) at the prompt's step boundaries."""

    scores: dict[int, float]
    features: dict[int, np.ndarray]
    cached: int = 0  # the prompt's first tokens that came from the prompt cache (not decoded)


class Sampler(Protocol):
    """One candidate's sampler on a runtime (its own seeded RNG stream and token history)."""

    def accept_all(self, tokens: Iterable[int]) -> None:
        """Feed history (the prompt) to stateful samplers such as the repetition penalty."""
        ...

    def close(self) -> None:
        """Free it."""
        ...


class Slots(Protocol):
    """One generation's slots on one runtime, one per candidate. Slots are numbered 0..k-1, one per candidate (k: the
    most candidates the generation may start)."""

    feature_width: int  # C of a step feature

    def prefill(self, prompt: list[int], wanted: set[int]) -> Prefilled:
        """Run the prompt into slot 0's cache. Return the step scores and features at `wanted`
        (the prompt's step boundaries); the last token's logits, feature and step score become
        every slot's."""
        ...

    def fork(self, first: int, n: int) -> None:
        """Give slots first..first+n-1 the prompt's cache, last logits, feature and step score:
        the first wave (first 0) from slot 0's prefill; a later wave (adaptive compute, when
        `settings.max_candidates` was set) from the prompt cache kept for it."""
        ...

    def sampler(self, sampling: SamplingSettings, candidate: int) -> Sampler:
        """A sampler for candidate `candidate` (seeded by (sampling.seed, candidate) only)."""
        ...

    def sample(self, slot: int, sampler: Sampler) -> int:
        """Draw `slot`'s next token from its last logits with `sampler`."""
        ...

    def logits(self, slot: int) -> np.ndarray:
        """`slot`'s last logits [V] (for log-probabilities)."""
        ...

    def feature(self, slot: int) -> np.ndarray | None:
        """The feature of `slot`'s last token (None when the runtime computes none)."""
        ...

    def step_score(self, slot: int) -> float | None:
        """The head's score of the step `slot`'s last token ends (None without one)."""
        ...

    def decode(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """Run one token per live slot as one batch: (slot, token, position), slots increasing."""
        ...

    def free(self, slot: int) -> None:
        """`slot`'s candidate ended: drop its cache."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes token `token` writes."""
        ...

    def is_eog(self, token: int) -> bool:
        """True when `token` ends the turn."""
        ...

    def close(self) -> None:
        """Free the generation's cache and buffers."""
        ...


class SlotSource(Protocol):
    """A model opened on one runtime, as the decode loop needs it."""

    @property
    def rule(self) -> StepRule:
        """Which tokens end a step and open/close the think window."""
        ...

    @property
    def has_head(self) -> bool:
        """True when the model scores steps."""
        ...

    @property
    def n_ctx(self) -> int:
        """The model's context length (prompt + new tokens may not exceed it)."""
        ...

    def open_slots(
        self,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
        control: GenerationControl | None = None,
    ) -> Slots:
        """Check what only this runtime limits, then open one generation's cache for k slots
        (noting in `tm` the KV layout and type it runs); a runtime shared by several requests
        waits for room there, polling `control.aborted`."""
        ...
