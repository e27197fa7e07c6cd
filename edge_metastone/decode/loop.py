"""The decode loop, written once for every runtime.

    prefill(prompt) in slot 0 -> fork(k): the prompt cache to k slots
    loop: sample each live slot -> accept: detect and score the step it closes, extend the text,
          stop strings, answer budget, events -> finish the ended ones, free their slots
          -> decode(live slots' new tokens) as one batch

A runtime supplies the operations on one generation's slots (`edge_metastone.decode.slots.Slots`);
prune and halt come from the caller's `GenerationControl` between decode steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from edge_metastone.decode.candidate import (
    CandidateRun,
    CandidateStream,
    forced_token,
    token_logprob,
)
from edge_metastone.decode.slots import Slots, SlotSource
from edge_metastone.errors import ContextExceededError, InvalidRequestError
from edge_metastone.types import (
    Event,
    FinishReason,
    GenerationControl,
    GenerationRequest,
    Timings,
    WaveEvent,
)


def check_request(req: GenerationRequest, n_ctx: int) -> None:
    """What every runtime refuses: no candidates, an empty prompt, more tokens than the context."""
    if req.k < 1:
        raise InvalidRequestError(f"k must be >= 1 (got {req.k})")
    if not req.prompt:
        raise InvalidRequestError("the prompt is empty")
    n, new = len(req.prompt), req.settings.max_new_tokens
    if n + new > n_ctx:
        raise ContextExceededError(
            f"prompt ({n} tokens) + max_new_tokens ({new}) exceeds the model's context of "
            f"{n_ctx} tokens"
        )


def decode_loop(
    source: SlotSource, req: GenerationRequest, control: GenerationControl
) -> Iterator[Event]:
    """Yield token, step and finish events of `req`'s candidates; candidate i samples with the
    seed (seed, candidate_offset + i). Timings add up in `control.timings`.

    Waves (adaptive compute): with `settings.max_candidates` above k, the first wave is k
    candidates; when all of a wave's candidates have ended the loop yields a `WaveEvent` "end",
    and if the caller then asked for more (`control.extend`), it forks them from the kept prompt
    cache and runs them as the next wave, until `max_candidates`."""
    check_request(req, source.n_ctx)
    t_start = time.perf_counter()
    tm = control.timings
    tm.prompt_tokens += len(req.prompt)
    scoring = req.settings.score_steps and source.has_head
    capacity = max(req.k, req.settings.max_candidates or req.k)
    slots = source.open_slots(req.prompt, capacity, req.settings, scoring, tm, control)
    seqs: list[CandidateStream] = []
    try:
        run, live = _start(source, slots, req, scoring, tm, capacity)
        seqs, size = list(live), req.k
        waves = capacity > req.k  # a fixed k runs one wave and yields no WaveEvent
        while True:
            tm.waves += 1
            if waves:
                yield WaveEvent(tm.waves, "start", size, len(seqs))
            yield from _wave(slots, live, control)
            if len(seqs) >= capacity or control.halted:
                break
            yield WaveEvent(tm.waves, "end", size, len(seqs))
            size = min(control.requested, capacity - len(seqs))
            control.requested = 0
            if size <= 0 or control.halted:
                break
            live = _more(slots, run, req, len(seqs), size)
            seqs += live
    finally:
        for seq in seqs:
            seq.sampler.close()
        slots.close()
        tm.total_s += time.perf_counter() - t_start


def _wave(slots: Slots, live: list[CandidateStream], control: GenerationControl) -> Iterator[Event]:
    """Run candidates until every one has ended: sample, accept, finish the ended ones, decode
    the rest as one batch."""
    tm = control.timings
    while live:
        for seq in live:
            tok = _next_token(seq, slots, control)
            if tok is not None:
                yield from seq.accept(tok, slots.token_bytes(tok))
        for seq in live:
            if seq.reason is not None:
                yield seq.finish()
                slots.free(seq.slot)
        live = [seq for seq in live if seq.reason is None]
        if live:
            t0 = time.perf_counter()
            slots.decode([(seq.slot, seq.prev, seq.pos) for seq in live])
            tm.decode_s += time.perf_counter() - t0
            tm.decode_steps += 1


def _start(
    source: SlotSource,
    slots: Slots,
    req: GenerationRequest,
    scoring: bool,
    tm: Timings,
    capacity: int,
) -> tuple[CandidateRun, list[CandidateStream]]:
    """The prompt's pass (its step scores and features), the fork to the first wave's k slots
    (the prompt cache kept for later waves when `capacity` > k), and one stream per candidate."""
    samplers = _samplers(slots, req, 0, req.k)
    try:
        t0 = time.perf_counter()
        prompt, rule = req.prompt, source.rule
        wanted = {
            j - 1 for j in range(1, len(prompt)) if rule.is_step_boundary(prompt[j - 1], prompt[j])
        }
        pre = slots.prefill(prompt, wanted)
        slots.fork(0, req.k)
        tm.prefill_tokens += len(prompt) - pre.cached
        tm.cached_prompt_tokens += pre.cached
        tm.prefill_s += time.perf_counter() - t0
    except BaseException:
        for sampler in samplers:
            sampler.close()
        raise
    run = CandidateRun(
        prompt, rule, req.settings, scoring, tm, slots.feature_width, pre.scores, pre.features
    )
    return run, [
        CandidateStream(req.candidate_offset + s, run, slots, s, samplers[s]) for s in range(req.k)
    ]


def _more(
    slots: Slots, run: CandidateRun, req: GenerationRequest, first: int, n: int
) -> list[CandidateStream]:
    """The next wave: slots first..first+n-1 forked from the kept prompt cache."""
    samplers = _samplers(slots, req, first, n)
    try:
        t0 = time.perf_counter()
        slots.fork(first, n)
        run.timings.prefill_tokens += n  # the prompt's last token again, in each new slot
        run.timings.prefill_s += time.perf_counter() - t0
    except BaseException:
        for sampler in samplers:
            sampler.close()
        raise
    return [
        CandidateStream(req.candidate_offset + first + s, run, slots, first + s, samplers[s])
        for s in range(n)
    ]


def _samplers(slots: Slots, req: GenerationRequest, first: int, n: int) -> list:
    """Candidates first..first+n-1's samplers, primed with the prompt where they need history."""
    offset = req.candidate_offset + first
    samplers = [slots.sampler(req.sampling, offset + s) for s in range(n)]
    if req.sampling.repeat_penalty != 1.0:
        for sampler in samplers:
            sampler.accept_all(req.prompt)
    return samplers


def _next_token(seq: CandidateStream, slots: Slots, control: GenerationControl) -> int | None:
    """Sample `seq`'s next token; None when it finished instead (halted, pruned, end of turn, or
    its running confidence fell below the floor)."""
    if seq.halted(control):
        return None
    tm = seq.run.timings
    t0 = time.perf_counter()
    tok = forced_token(seq)
    if tok is None:
        tok = slots.sample(seq.slot, seq.sampler)
    else:  # written for it (its thinking budget ran out): the sampler's history gets it too
        seq.sampler.accept_all((tok,))
    eog = slots.is_eog(tok)
    low = False
    if seq.run.settings.logprobs:
        lp = token_logprob(slots.logits(seq.slot), tok)
        low = seq.scored(lp, control.window, None if eog else control.min_confidence)
    tm.sample_s += time.perf_counter() - t0
    if eog:
        seq.reason = FinishReason.EOS
        return None
    return None if low else tok
