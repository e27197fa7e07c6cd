"""The sequence pool's types: its shape, one generation's lease, one round's work, a cached
prompt (`edge_metastone.engine.pool` holds the pool itself)."""

from __future__ import annotations

import dataclasses
import threading
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
    started: bool = False  # it has submitted work (its live sequences say what it decodes)
    wake: threading.Condition | None = None  # on the pool's lock: its round has run

    @property
    def rows(self) -> int:
        """Sequences it decodes, or will once it starts (all it leased)."""
        return len(self.live) if self.started else len(self.seqs)


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


class BatchGovernor:
    """How many sequences to decode together: the rows/s each batch size has given (by powers
    of two, a moving average over whole cycles: the decode and the members' own work between
    two decodes), and a cap at twice the best size seen often enough. A compute-bound model (the
    embedded one on a CPU) gains nothing past a few rows and loses to cache misses and Python
    beyond; a memory-bound one gains up to tens of rows. The cap lets the batch grow one size past
    the best until that size has been seen (then it stays below it)."""

    MIN_SEEN = 8  # cycles of a size before it counts

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}  # batch-size bucket (a power of two) -> rows per second
        self.seen: dict[int, int] = {}

    def observe(self, rows: int, seconds: float) -> None:
        """One cycle of `rows` rows took `seconds`."""
        if rows < 1 or seconds <= 0:
            return
        b = 1 << (rows.bit_length() - 1)
        rate = rows / seconds
        self.rates[b] = rate if b not in self.rates else 0.8 * self.rates[b] + 0.2 * rate
        self.seen[b] = self.seen.get(b, 0) + 1

    def cap(self) -> int | None:
        """The most sequences to run at once (None until two sizes were seen often enough)."""
        known = [b for b in self.rates if self.seen[b] >= self.MIN_SEEN]
        if len(known) < 2:
            return None
        best = max(known, key=lambda b: (self.rates[b], b))
        if 2 * best in known:  # the next size was tried and gave less: stay below it
            return 2 * best - 1
        return 2 * best  # let the batch try the next size
