"""`SequencePool`: one long-lived llama.cpp context per opened model, shared by every generation.

Continuous batching across requests. The context holds a pool of sequences, one KV stream each.
A generation leases the sequences its candidates need (`acquire`, first come first served) and
gives each back as its candidate ends. Every decode goes through `run`, a rendezvous over all open
generations ("members"):

    each member submits its next piece of work (a prompt chunk, or its live sequences' tokens)
    -> when every member has submitted, the pool's step thread runs the round (always that
       thread, even for a member alone: see `Rounds._step_loop`), and wakes only the members in it:
       a prompt chunk alone (one per round, oldest first: a long prompt never stalls the others
       for more than one chunk), else every member's tokens as one llama_decode
    -> each member reads its rows (logits, features) and samples, then submits again

A round runs only while every member waits in `run`, so between rounds each member may read its
rows and change its own sequences without racing a decode. Pool changes (leases, sequence copies
and removals, the rounds themselves) happen under one lock.

The pool's shape (sequences, cells per stream, KV type) grows to fit what requests ask: a request
that does not fit (or finds every sequence leased) waits until the pool is idle, then the pool is
built anew, large enough for it and for the requests queued behind it, never narrower than
before; so a model serving N requests at once rebuilds its context a few times at first, then
keeps it. `min_sequences` starts it wider (a server's `--parallel`). A request that needs the unified KV layout (one buffer, the
prompt stored once: long prompts, tight memory) has the pool to itself.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import llama_cpp
import numpy as np

from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, Model
from edge_metastone.engine.pool_admission import MAX_SEQUENCES, Admission
from edge_metastone.engine.pool_rounds import Rounds
from edge_metastone.engine.pool_types import BatchGovernor, CachedPrompt, Lease, PoolShape
from edge_metastone.errors import EdgeMetastoneError, RequestCancelledError


class SequencePool(Admission, Rounds):
    """The shared context of one model (see the module's docstring). `feature_layer`: the layer
    whose rows a capturing pool's decodes keep."""

    def __init__(
        self, model: Model, n_threads: int, feature_layer: int, min_sequences: int = 1
    ) -> None:
        self.model = model
        self.n_threads = n_threads
        self.feature_layer = feature_layer
        self.min_sequences = max(1, min(MAX_SEQUENCES, min_sequences))
        self.shape: PoolShape | None = None
        self.ctx: Context | None = None
        self.batch: Batch | None = None
        self.capture: FeatureCapture | None = None
        self.governor = BatchGovernor()  # how many sequences decode together (admission)
        self._cycle_start: float | None = None  # when the last decode round ended
        self.rebuilds = 0  # contexts made (a measure of how well the first shape fitted)
        self.moves = 0  # sequences moved down to close gaps (`_compact`)
        self.flash = False
        self._lock = threading.Lock()  # admission, leases, rounds: one lock
        self._cond = threading.Condition(self._lock)  # requests waiting for admission
        self._due = threading.Condition(self._lock)  # the step thread waits for a round
        self._stepper: threading.Thread | None = None
        self._free: list[int] = []  # unleased sequences, kept sorted
        self._cached: dict[int, CachedPrompt] = {}  # free sequences holding a prompt's cells
        self._members: dict[int, Lease] = {}  # ticket -> lease
        self._queue: collections.deque[tuple[int, PoolShape]] = collections.deque()
        self._tickets = 0
        self._last_was_prompt = False
        self._grow = False  # a request waits for sequences: rebuild wider once idle
        self._closed = False

    def copy(self, lease: Lease, src: int, dst: int, *, drop_from: int | None = None) -> None:
        """Sequence `dst` (the lease's) gets `src`'s cells (all, or those before `drop_from`)."""
        with self._cond:
            mem = self.ctx.memory
            llama_cpp.llama_memory_seq_rm(mem, dst, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, src, dst, -1, -1)
            if drop_from is not None:
                llama_cpp.llama_memory_seq_rm(mem, dst, drop_from, -1)
            lease.live.add(dst)

    def drop(self, lease: Lease, seq: int, *, keep: int = 0) -> None:
        """Sequence `seq`'s candidate ended: remove its cells (it may fill gaps from now on), or
        all but the first `keep` (a prompt kept for the prompt cache: it stays live)."""
        with self._cond:
            if self.ctx is not None:
                llama_cpp.llama_memory_seq_rm(self.ctx.memory, seq, keep, -1)
            if not keep:
                lease.live.discard(seq)
                self._cond.notify_all()  # a request waiting under the governor's cap may fit

    def release(
        self,
        lease: Lease,
        keep: tuple[int, Sequence[int], dict[int, np.ndarray] | None] | None = None,
    ) -> None:
        """The generation ended: its sequences go back to the pool (a round waiting on it runs).
        `keep` = (sequence, prompt, features): that sequence holds exactly the prompt's cells,
        kept for a later request whose prompt starts the same way (`acquire`)."""
        with self._cond:
            if self._members.pop(lease.ticket, None) is None:
                return
            if self.ctx is not None:
                for s in lease.seqs:
                    if keep is not None and s == keep[0]:
                        llama_cpp.llama_memory_seq_rm(self.ctx.memory, s, len(keep[1]), -1)
                        self._cached[s] = CachedPrompt(tuple(keep[1]), keep[2])
                    else:
                        llama_cpp.llama_memory_seq_rm(self.ctx.memory, s, -1, -1)
            self._free = sorted(self._free + lease.seqs)
            lease.live.clear()
            if self._stepper is not None and self._ready():
                self._due.notify()
            self._cond.notify_all()

    @property
    def live_sequences(self) -> int:
        """Sequences of open generations that hold cells now (their candidates decode)."""
        return sum(len(m.live) for m in list(self._members.values()))

    @property
    def busy(self) -> int:
        """Generations holding sequences now."""
        return len(self._members)

    def _close_context(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        self.shape, self._free, self._cached = None, [], {}

    def reset(self) -> None:
        """Free the context while no generation runs (the next one builds it anew): memory back
        to the machine between bursts of work."""
        with self._cond:
            if self._members:
                raise EdgeMetastoneError("the model is generating: its context cannot be reset")
            self._close_context()

    def close(self) -> None:
        """Free the context (callers make sure no generation runs); waiting requests fail."""
        with self._cond:
            self._closed = True
            self._close_context()
            for m in self._members.values():  # a member waiting for a round gets an error
                if m.pending is not None:
                    m.pending.error = RequestCancelledError("the model was closed")
                    m.pending.done, m.pending = True, None
                    m.wake.notify()
            self._cond.notify_all()
            self._due.notify_all()
