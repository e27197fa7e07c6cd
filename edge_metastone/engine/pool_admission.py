"""Admission to the sequence pool: leases in arrival order, the pool's shape grown to fit (a
context rebuilt while idle), and the prompt cache's choice of first sequence."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

import llama_cpp

from edge_metastone.engine.capture import FeatureCapture
from edge_metastone.engine.llama import Batch, Context, ContextSettings
from edge_metastone.engine.pool_types import Lease, PoolShape, common_prefix
from edge_metastone.errors import EdgeMetastoneError, RequestCancelledError
from edge_metastone.kvpolicy import flash_attention

logger = logging.getLogger(__name__)

# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context holds
MAX_SEQUENCES = 256


class Admission:
    """The pool's admission half (`SequencePool` has the state; see its docstring)."""

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
            lease = _lease(self, ticket, need.n_seq, prompt)
            self._members[ticket] = lease
            self._cond.notify_all()
            return lease

    def _admit(self, ticket: int, need: PoolShape) -> bool:
        """At the head of the queue: fits now (rebuilding an idle pool to fit)."""
        if self._queue[0][0] != ticket or self._closed:
            return False
        shape = self.shape
        if shape is not None and shape.holds(need) and not self._grow:
            if not shape.streams and self._members:
                return False  # a unified pool serves one request at a time
            cap = self.governor.cap()
            rows = sum(m.rows for m in self._members.values())
            if cap is not None and self._members and rows + need.n_seq > cap:
                return False  # more rows would not decode faster: wait for some to end
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
            self.model.n_heads,
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


def _lease(pool: Admission, ticket: int, n: int, prompt: Sequence[int]) -> Lease:
    """Take n free sequences: the best cached prompt first (when one shares a prefix), then
    the lowest uncached ones, cached ones last (their caches are dropped)."""
    reuse, best = None, 0
    for seq, cached in pool._cached.items():
        m = common_prefix(cached.tokens, prompt)
        if m > best:
            reuse, best = seq, m
    best = min(best, len(prompt) - 1)
    rest = sorted((s for s in pool._free if s != reuse), key=lambda s: (s in pool._cached, s))
    seqs = ([reuse] if reuse is not None and best > 0 else []) + rest
    seqs = seqs[:n]
    taken = set(seqs)
    pool._free = [s for s in pool._free if s not in taken]
    lease = Lease(seqs, ticket, wake=threading.Condition(pool._lock))
    mem = pool.ctx.memory
    for s in seqs:
        cached = pool._cached.pop(s, None)
        if s == reuse and best > 0:
            llama_cpp.llama_memory_seq_rm(mem, s, best, -1)
            lease.reused, lease.reused_features = best, cached.features
            lease.live.add(s)
        else:  # a filler or an old prompt may have left cells in it
            llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
    return lease
