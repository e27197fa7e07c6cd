"""The sequence pool's types: its shape, one generation's lease, one round's work, a cached
prompt (`edge_metastone.engine.pool` holds the pool itself)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_metastone.limits import PREFILL_BATCH


@dataclass(frozen=True)
class PoolShape:
    """A pool context's geometry: `n_seq` sequences; per-sequence KV streams of `cells` cells
    each (`streams`), or one unified buffer of `cells` cells."""

    n_seq: int
    cells: int
    streams: bool
    kv_type: str
    parity: bool
    capture: bool = False  # every decode captures the feature layer's rows

    def holds(self, need: PoolShape) -> bool:
        """True when a request of shape `need` can run in a pool of this shape."""
        if need.streams != self.streams or need.kv_type != self.kv_type:
            return False
        if need.parity != self.parity or need.n_seq > self.n_seq:
            return False
        if need.capture and not self.capture:
            return False
        return (
            need.cells <= self.cells
            if self.streams
            else dataclasses.replace(need, capture=self.capture) == self
        )

    @property
    def n_ctx(self) -> int:
        """Cells the context allocates in all."""
        return self.n_seq * self.cells if self.streams else self.cells

    @property
    def n_batch(self) -> int:
        """Rows per decode: a prompt chunk, or one token of every sequence (llama.cpp also needs
        n_seq_max <= n_batch)."""
        return max(PREFILL_BATCH, self.n_seq)


@dataclass(frozen=True)
class CachedPrompt:
    """A free sequence that still holds the cells of a finished generation's prompt: `tokens`,
    and the captured features at its step boundaries (`features`, by position; None: none)."""

    tokens: tuple[int, ...]
    features: dict[int, np.ndarray] | None


@dataclass
class Lease:
    """One generation's sequences in the pool (its slot s is pool sequence `seqs[s]`). `reused`:
    how many of the prompt's first tokens its first sequence already holds (prompt cache), and
    their cached features."""

    seqs: list[int]
    ticket: int
    pending: Work | None = None
    live: set[int] = field(default_factory=set)  # sequences that hold cells
    reused: int = 0
    reused_features: dict[int, np.ndarray] | None = None


@dataclass
class Work:
    """What a member asks of one round. A prompt chunk: `tokens` at `start`.. in sequence
    `seq`, the last one's logits kept when `logits`; else `rows` (sequence, token, position), one
    token per live sequence. Filled in by the round: `out` (each row's batch index), `features`
    (each row's captured feature, when the pool captures), or `error`."""

    rows: Sequence[tuple[int, int, int]] = ()
    seq: int = -1
    tokens: Sequence[int] = ()
    start: int = 0
    logits: bool = False
    out: list[int] = field(default_factory=list)
    features: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    shared: bool = False  # other generations were open in the round (batched with it, or waited)

    @property
    def is_prompt(self) -> bool:
        """A prompt chunk (its own round), not a decode step."""
        return bool(self.tokens)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
