"""The sequence pool's rounds: every open generation's work decoded together, one prompt chunk
or one batch of every live sequence's next token a round, on the pool's one step thread."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

import llama_cpp

from edge_metastone import cpu
from edge_metastone.engine.pool_types import Lease, Work
from edge_metastone.errors import EdgeMetastoneError

# A gap in the decoded sequence ids makes llama.cpp split a decode into one graph per run of
# consecutive ids (split_equal), and each graph reads every weight again. A generation alone puts a
# placeholder token in each idle sequence of a short gap (position 0 of its emptied stream, no
# output, removed after the decode), which keeps the run whole for about one row's cost each
# (200M Q4_0, 2 threads: ~0.8 ms per extra row, ~4 ms per extra graph): gaps of up to this many
# ids are filled. Several generations close gaps by moving sequences instead (`_compact`): with
# many candidates ending at different times, placeholders would be half the batch.
MAX_FILLED_GAP = 4
_FILLER_TOKEN = 0


class Rounds:
    """The pool's decoding half (`SequencePool` has the state; see its docstring)."""

    def run(self, lease: Lease, work: Work) -> Work:
        """Submit `work` and wait for the round that runs it (see the module's docstring)."""
        with self._cond:
            if lease.ticket not in self._members:
                raise EdgeMetastoneError("the generation's sequences were given back")
            lease.pending = work
            lease.started = True
            lease.live.update([work.seq] if work.is_prompt else (r[0] for r in work.rows))
            self._wake_stepper()
            while not work.done:
                lease.wake.wait()
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
            self._cycle_start = None  # the next decode's cycle would count this chunk too
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
            m.wake.notify()  # only the round's own members wake (not every waiting thread)

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
        streams = self.shape.streams  # a unified cache decodes any ids as one graph
        fill = streams and len(works) == 1
        if streams and not fill:
            compact(self, works)
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
        end = time.perf_counter()
        if self._cycle_start is not None:  # the members' work since the last decode, and this one
            self.governor.observe(len(b), end - self._cycle_start)
        self._cycle_start = end
        if self.capture is not None:
            feats = self.capture.take()
            for w in works:
                w.features = feats[w.out] if w.out else None

    def _idle(self) -> set[int]:
        """Sequences that hold no live cells (free, or ended candidates' of a lease)."""
        idle = set(self._free)
        for m in self._members.values():
            idle.update(s for s in m.seqs if s not in m.live)
        return idle

    def _decode(self) -> None:
        """Decode the batch (holding `cpu.heavy`: no other heavy phase beside it); then settle
        llama.cpp's output order once, so members reading their rows from their own threads only
        read."""
        with cpu.heavy:
            self.ctx.decode(self.batch)
        llama_cpp.llama_get_logits(self.ctx.ptr)


def compact(pool: Rounds, works: list[Work]) -> None:
    """Move the highest decoding sequences into idle ones below them, so the decoded ids run
    without gaps where they can: with per-sequence streams llama.cpp decodes each run of
    consecutive ids as a graph of its own, which reads every weight again (a graph per
    request when candidates end at different times). A move copies the stream's cells
    (llama.cpp does it at the next decode, before anything is written) and hands the ids'
    ownership over; the candidate's own slot keeps its meaning through `Lease.seqs`."""
    decoding = sorted(seq for w in works for seq, _, _ in w.rows)
    if not decoding:
        return
    idle = pool._idle()
    holes = sorted((s for s in idle if s < decoding[-1]), key=lambda s: (s in pool._cached, s))
    if not holes:
        return
    owner = {s: m for m in pool._members.values() for s in m.seqs}
    mem = pool.ctx.memory
    while True:
        below = [h for h in holes if h < decoding[-1]]
        if not below:
            break
        dst, src = below[0], decoding.pop()
        holes.remove(dst)
        pool._cached.pop(dst, None)
        llama_cpp.llama_memory_seq_cp(mem, src, dst, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, src, -1, -1)
        mover, other = owner[src], owner.get(dst)
        mover.seqs[mover.seqs.index(src)] = dst
        mover.live.discard(src)
        mover.live.add(dst)
        if other is None:  # a free sequence: src becomes free
            pool._free.remove(dst)
            pool._free = sorted([*pool._free, src])
        else:  # another lease's idle sequence (an ended or not yet started candidate)
            other.seqs[other.seqs.index(dst)] = src
            owner[src] = other
        owner[dst] = mover
        w = mover.pending
        w.rows = [(dst if seq == src else seq, tok, pos) for seq, tok, pos in w.rows]
        bisect.insort(decoding, dst)
        pool.moves += 1
