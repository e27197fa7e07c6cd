"""`SequencePool`: one long-lived llama.cpp context per opened model, shared by every generation.

Continuous batching across requests. The context holds a pool of sequences, one KV stream each.
A generation leases the sequences its candidates need (`acquire`, first come first served) and
gives each back as its candidate ends. Every decode goes through `run`, a rendezvous over all open
generations ("members"):

    each member submits its next piece of work (a prompt chunk, or its live sequences' tokens)
    -> when every member has submitted, the pool's step thread runs the round (a member alone
       runs its own, with no hand-off):
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

import bisect
import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
from edge_metastone.errors import EdgeMetastoneError, RequestCancelledError
from edge_metastone.kvpolicy import flash_attention
from edge_metastone.limits import PREFILL_BATCH

logger = logging.getLogger(__name__)

# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context holds
MAX_SEQUENCES = 256
# A gap in the decoded sequence ids makes llama.cpp split a decode into one graph per run of
# consecutive ids (split_equal), and each graph reads every weight again. A generation alone puts a
# placeholder token in each idle sequence of a short gap (position 0 of its emptied stream, no
# output, removed after the decode), which keeps the run whole for about one row's cost each
# (200M Q4_0, 2 threads: ~0.8 ms per extra row, ~4 ms per extra graph): gaps of up to this many
# ids are filled. Several generations close gaps by moving sequences instead (`_compact`): with
# many candidates ending at different times, placeholders would be half the batch.
MAX_FILLED_GAP = 4
_FILLER_TOKEN = 0


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


class SequencePool:
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
        self.rebuilds = 0  # contexts made (a measure of how well the first shape fitted)
        self.moves = 0  # sequences moved down to close gaps (`_compact`)
        self.flash = False
        self._cond = threading.Condition()  # admission, leases, rounds: one lock
        self._due = threading.Condition(self._cond._lock)  # the step thread waits for a round
        self._stepper: threading.Thread | None = None
        self._free: list[int] = []  # unleased sequences, kept sorted
        self._cached: dict[int, CachedPrompt] = {}  # free sequences holding a prompt's cells
        self._members: dict[int, Lease] = {}  # ticket -> lease
        self._queue: collections.deque[tuple[int, PoolShape]] = collections.deque()
        self._tickets = 0
        self._last_was_prompt = False
        self._grow = False  # a request waits for sequences: rebuild wider once idle
        self._closed = False

    # --- admission ------------------------------------------------------------------------

    def acquire(
        self,
        need: PoolShape,
        cancelled: Callable[[], bool] | None = None,
        prompt: Sequence[int] = (),
    ) -> Lease:
        """Lease `need.n_seq` sequences, in arrival order: wait while the pool is full (or, for a
        shape it cannot hold, until it is idle and rebuilt). `cancelled` is polled while waiting.
        With a `prompt`, the first sequence is the free one whose cached prompt shares the longest
        prefix with it (`Lease.reused` tokens, at most all but its last)."""
        if need.n_seq > MAX_SEQUENCES:
            raise EdgeMetastoneError(f"at most {MAX_SEQUENCES} sequences run at once")
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
            self._queue.append((ticket, need))
            try:
                while not self._admit(ticket, need):
                    if self._closed:
                        raise RequestCancelledError("the model was closed")
                    if cancelled is not None and cancelled():
                        raise RequestCancelledError("the request was cancelled while it waited")
                    self._cond.wait(0.05 if cancelled is not None else None)
            except BaseException:
                self._queue = collections.deque(t for t in self._queue if t[0] != ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            lease = self._lease(ticket, need.n_seq, prompt)
            self._members[ticket] = lease
            self._cond.notify_all()
            return lease

    def _lease(self, ticket: int, n: int, prompt: Sequence[int]) -> Lease:
        """Take n free sequences: the best cached prompt first (when one shares a prefix), then
        the lowest uncached ones, cached ones last (their caches are dropped)."""
        reuse, best = None, 0
        for seq, cached in self._cached.items():
            m = _common_prefix(cached.tokens, prompt)
            if m > best:
                reuse, best = seq, m
        best = min(best, len(prompt) - 1)
        rest = sorted((s for s in self._free if s != reuse), key=lambda s: (s in self._cached, s))
        seqs = ([reuse] if reuse is not None and best > 0 else []) + rest
        seqs = seqs[:n]
        taken = set(seqs)
        self._free = [s for s in self._free if s not in taken]
        lease = Lease(seqs, ticket)
        mem = self.ctx.memory
        for s in seqs:
            cached = self._cached.pop(s, None)
            if s == reuse and best > 0:
                llama_cpp.llama_memory_seq_rm(mem, s, best, -1)
                lease.reused, lease.reused_features = best, cached.features
                lease.live.add(s)
            else:  # a filler or an old prompt may have left cells in it
                llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
        return lease

    def _admit(self, ticket: int, need: PoolShape) -> bool:
        """At the head of the queue: fits now (rebuilding an idle pool to fit)."""
        if self._queue[0][0] != ticket or self._closed:
            return False
        shape = self.shape
        if shape is not None and shape.holds(need) and not self._grow:
            if not shape.streams and self._members:
                return False  # a unified pool serves one request at a time
            if len(self._free) >= need.n_seq:
                return True
            if shape.n_seq >= MAX_SEQUENCES:
                return False
            self._grow = True  # full: let it drain, then rebuild it wider
        if self._members:
            return False
        self._grow = False
        self._rebuild(self._grown(need))
        return True

    def _grown(self, need: PoolShape) -> PoolShape:
        """The shape to rebuild an idle pool to: `need`, widened for the requests queued behind it
        that can share it, and never narrower than the pool it replaces (of the same kind)."""
        if not need.streams:
            return need
        n_seq, cells = need.n_seq, need.cells
        for _, other in list(self._queue)[1:]:
            if other.streams and other.kv_type == need.kv_type and other.parity == need.parity:
                if n_seq + other.n_seq > MAX_SEQUENCES:
                    break
                n_seq, cells = n_seq + other.n_seq, max(cells, other.cells)
        old = self.shape
        if (
            old is not None
            and old.streams
            and (old.kv_type, old.parity)
            == (
                need.kv_type,
                need.parity,
            )
        ):
            n_seq, cells = max(n_seq, old.n_seq), max(cells, old.cells)
            capture = need.capture or old.capture
        else:
            capture = need.capture
        n_seq = min(MAX_SEQUENCES, max(n_seq, self.min_sequences))
        return dataclasses.replace(need, n_seq=n_seq, cells=cells, capture=capture)

    def _rebuild(self, shape: PoolShape) -> None:
        """Free the idle context and make one of `shape`."""
        self._close_context()
        flash = flash_attention(
            shape.kv_type,
            self.model.n_head,
            shape.n_ctx,
            shape.n_batch,
            shape.n_seq if shape.streams else 1,
        )
        settings = ContextSettings(
            n_ctx=shape.n_ctx,
            n_batch=shape.n_batch,
            n_seq_max=shape.n_seq,
            n_threads=self.n_threads,
            parity=shape.parity,
            kv_unified=not shape.streams,
            kv_type="f16" if shape.parity else shape.kv_type,
            flash_attn=flash and not shape.parity,
        )
        cap = None
        if shape.capture:
            cap = FeatureCapture(self.feature_layer, self.model.n_embd, capacity=shape.n_batch)
        ctx = Context(
            self.model,
            settings,
            cb_eval=cap.callback if cap else None,
            cb_user_data=cap.user_data if cap else None,
        )
        try:
            batch = Batch(shape.n_batch, 1)
        except BaseException:
            ctx.close()
            raise
        self.ctx, self.batch, self.capture, self.shape = ctx, batch, cap, shape
        self.flash = settings.flash_attn
        self._free = list(range(shape.n_seq))
        self._cached = {}
        self.rebuilds += 1
        logger.debug("sequence pool: %s (flash attention %s)", shape, self.flash)

    # --- members' sequences ---------------------------------------------------------------

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
    def busy(self) -> int:
        """Generations holding sequences now."""
        return len(self._members)

    # --- rounds ---------------------------------------------------------------------------

    def run(self, lease: Lease, work: Work) -> Work:
        """Submit `work` and wait for the round that runs it (see the module's docstring)."""
        with self._cond:
            if lease.ticket not in self._members:
                raise EdgeMetastoneError("the generation's sequences were given back")
            lease.pending = work
            lease.live.update([work.seq] if work.is_prompt else (r[0] for r in work.rows))
            self._wake_stepper()
            while not work.done:
                self._cond.wait()
        if work.error is not None:
            raise work.error
        return work

    def _ready(self) -> bool:
        """Every open generation has submitted its work."""
        return bool(self._members) and all(m.pending is not None for m in self._members.values())

    def _wake_stepper(self) -> None:
        """Tell the step thread a round may be due (lock held); start it the first time."""
        if self._stepper is None:
            self._stepper = threading.Thread(
                target=self._step_loop, name="edge-metastone-steps", daemon=True
            )
            self._stepper.start()
        if self._ready():
            self._due.notify()

    def _step_loop(self) -> None:
        """Run rounds while several generations are open. One thread decodes them all: llama.cpp
        computes on the calling thread's OpenMP team, and a team left by a thread that decoded a
        moment ago keeps spinning on the 2 cores, so a round run by whichever member came last
        would fight the previous one's team (2-3x slower here)."""
        with self._cond:
            while not self._closed:
                if self._ready():
                    self._round()
                    self._cond.notify_all()
                else:
                    self._due.wait()

    def _round(self) -> None:
        """One round (lock held, every member waiting): a prompt chunk alone, or every member's
        decode rows as one batch. Prompt chunks and decode steps alternate while both wait."""
        members = sorted(self._members.values(), key=lambda m: m.ticket)
        for m in members:
            m.pending.shared = m.pending.shared or len(members) > 1
        prompts = [m for m in members if m.pending.is_prompt]
        steps = [m for m in members if not m.pending.is_prompt]
        if prompts and (not steps or not self._last_was_prompt):
            self._last_was_prompt = True
            self._finish([prompts[0]], self._prompt_chunk, prompts[0].pending)
        else:
            self._last_was_prompt = False
            self._finish(steps, self._decode_rows, [m.pending for m in steps])

    def _finish(self, members: list[Lease], run: Callable, arg: object) -> None:
        """Run the round; every member in it gets its work back (or the round's error)."""
        err: BaseException | None = None
        try:
            run(arg)
        except BaseException as e:
            err = e
        for m in members:
            w = m.pending
            m.pending = None
            w.error, w.done = err, True

    def _prompt_chunk(self, w: Work) -> None:
        """Decode one chunk of a prompt in its sequence; its rows' features go to `w.features`."""
        b = self.batch
        b.clear()
        n = len(w.tokens)
        for i, tok in enumerate(w.tokens):
            b.add(tok, w.start + i, (w.seq,), w.logits and i == n - 1)
        self._decode()
        w.out = [n - 1]
        w.features = self.capture.take()[:n].copy() if self.capture is not None else None

    def _decode_rows(self, works: list[Work]) -> None:
        """Every member's rows, in increasing sequence order, as one decode. Gaps between the
        decoded ids are closed by moving sequences when several generations share the round
        (`_compact`); a generation alone fills short gaps with placeholders instead, which keeps
        each candidate's row where it was, so its tokens do not depend on when the others end."""
        fill = len(works) == 1
        if not fill:
            self._compact(works)
        rows = sorted(
            (seq, tok, pos, wi, ri)
            for wi, w in enumerate(works)
            for ri, (seq, tok, pos) in enumerate(w.rows)
        )
        if not rows:
            return
        b = self.batch
        b.clear()
        for w in works:
            w.out = [0] * len(w.rows)
        idle = self._idle() - set(self._cached) if fill else set()
        fillers: list[int] = []
        prev = None
        for seq, tok, pos, wi, ri in rows:
            if fill and prev is not None and 0 < seq - prev - 1 <= MAX_FILLED_GAP:
                gap = range(prev + 1, seq)
                if all(g in idle for g in gap):
                    for g in gap:
                        b.add(_FILLER_TOKEN, 0, (g,), False)
                        fillers.append(g)
            works[wi].out[ri] = b.add(tok, pos, (seq,), True)
            prev = seq
        try:
            self._decode()
        finally:
            for g in fillers:
                llama_cpp.llama_memory_seq_rm(self.ctx.memory, g, -1, -1)
        if self.capture is not None:
            feats = self.capture.take()
            for w in works:
                w.features = feats[w.out] if w.out else None

    def _compact(self, works: list[Work]) -> None:
        """Move the highest decoding sequences into idle ones below them, so the decoded ids run
        without gaps where they can: with per-sequence streams llama.cpp decodes each run of
        consecutive ids as a graph of its own, which reads every weight again (a graph per
        request when candidates end at different times). A move copies the stream's cells
        (llama.cpp does it at the next decode, before anything is written) and hands the ids'
        ownership over; the candidate's own slot keeps its meaning through `Lease.seqs`."""
        decoding = sorted(seq for w in works for seq, _, _ in w.rows)
        if not decoding:
            return
        idle = self._idle()
        holes = sorted((s for s in idle if s < decoding[-1]), key=lambda s: (s in self._cached, s))
        if not holes:
            return
        owner = {s: m for m in self._members.values() for s in m.seqs}
        mem = self.ctx.memory
        while True:
            below = [h for h in holes if h < decoding[-1]]
            if not below:
                break
            dst, src = below[0], decoding.pop()
            holes.remove(dst)
            self._cached.pop(dst, None)
            llama_cpp.llama_memory_seq_cp(mem, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, src, -1, -1)
            mover, other = owner[src], owner.get(dst)
            mover.seqs[mover.seqs.index(src)] = dst
            mover.live.discard(src)
            mover.live.add(dst)
            if other is None:  # a free sequence: src becomes free
                self._free.remove(dst)
                self._free = sorted([*self._free, src])
            else:  # another lease's idle sequence (an ended or not yet started candidate)
                other.seqs[other.seqs.index(dst)] = src
                owner[src] = other
            owner[dst] = mover
            w = mover.pending
            w.rows = [(dst if seq == src else seq, tok, pos) for seq, tok, pos in w.rows]
            bisect.insort(decoding, dst)
            self.moves += 1

    def _idle(self) -> set[int]:
        """Sequences that hold no live cells (free, or ended candidates' of a lease)."""
        idle = set(self._free)
        for m in self._members.values():
            idle.update(s for s in m.seqs if s not in m.live)
        return idle

    def _decode(self) -> None:
        """Decode the batch; then settle llama.cpp's output order once, so members reading
        their rows from their own threads only read."""
        self.ctx.decode(self.batch)
        llama_cpp.llama_get_logits(self.ctx.ptr)

    # --- lifetime -------------------------------------------------------------------------

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
            self._cond.notify_all()
            self._due.notify_all()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
