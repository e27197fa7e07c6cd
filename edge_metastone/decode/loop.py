"""The decode loop, written once for every runtime.

    prefill(prompt) in slot 0 -> fork(k): the prompt cache to k slots
    loop: sample each live slot -> accept: detect and score the step it closes, extend the text,
          stop strings, answer budget, events -> finish the ended ones, free their slots
          -> decode(live slots' new tokens) as one batch

A runtime supplies the named steps (`edge_metastone.decode.steps.Steps`); prune and halt come from
the caller's `GenerationControl` between steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from edge_metastone.decode.candidate import CandidateRun, CandidateStream, token_logprob
from edge_metastone.decode.steps import Runtime, Steps
from edge_metastone.errors import ContextExceededError, InvalidRequestError
from edge_metastone.types import (
    Event,
    FinishReason,
    GenerationControl,
    GenerationRequest,
    Timings,
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
    runtime: Runtime, req: GenerationRequest, control: GenerationControl
) -> Iterator[Event]:
    """Yield token, step and finish events of `req`'s k candidates; candidate i samples with the
    seed (seed, candidate_offset + i). Timings add up in `control.timings`."""
    check_request(req, runtime.n_ctx)
    t_start = time.perf_counter()
    tm = control.timings
    tm.prompt_tokens += len(req.prompt)
    scoring = req.settings.score_steps and runtime.has_head
    steps = runtime.open_steps(req.prompt, req.k, req.settings, scoring, tm)
    seqs: list[CandidateStream] = []
    try:
        seqs = _start(runtime, steps, req, scoring, tm)
        live = seqs
        while live:
            for seq in live:
                tok = _next_token(seq, steps, control)
                if tok is not None:
                    yield from seq.accept(tok, steps.token_bytes(tok))
            for seq in live:
                if seq.reason is not None:
                    yield seq.finish()
                    steps.free(seq.slot)
            live = [seq for seq in live if seq.reason is None]
            if live:
                t0 = time.perf_counter()
                steps.decode([(seq.slot, seq.prev, seq.pos) for seq in live])
                tm.decode_s += time.perf_counter() - t0
                tm.decode_steps += 1
    finally:
        for seq in seqs:
            seq.sampler.close()
        steps.close()
        tm.total_s += time.perf_counter() - t_start


def _start(
    runtime: Runtime, steps: Steps, req: GenerationRequest, scoring: bool, tm: Timings
) -> list[CandidateStream]:
    """Samplers, the prompt's pass (its step scores and features), the fork to k slots, and one
    stream per candidate."""
    samplers = [steps.sampler(req.sampling, req.candidate_offset + s) for s in range(req.k)]
    if req.sampling.repeat_penalty != 1.0:
        for sampler in samplers:
            sampler.accept_all(req.prompt)
    try:
        t0 = time.perf_counter()
        prompt, rule = req.prompt, runtime.rule
        wanted = {
            j - 1 for j in range(1, len(prompt)) if rule.is_step_boundary(prompt[j - 1], prompt[j])
        }
        pre = steps.prefill(prompt, wanted)
        steps.fork(req.k)
        tm.prefill_s += time.perf_counter() - t0
    except BaseException:
        for sampler in samplers:
            sampler.close()
        raise
    run = CandidateRun(
        prompt, rule, req.settings, scoring, tm, steps.feature_width, pre.scores, pre.features
    )
    return [
        CandidateStream(req.candidate_offset + s, run, steps, s, samplers[s]) for s in range(req.k)
    ]


def _next_token(seq: CandidateStream, steps: Steps, control: GenerationControl) -> int | None:
    """Sample `seq`'s next token; None when it finished instead (halted, pruned, end of turn)."""
    if seq.halted(control):
        return None
    tm = seq.run.timings
    t0 = time.perf_counter()
    tok = steps.sample(seq.slot, seq.sampler)
    if seq.run.settings.logprobs:
        seq.logprob_sum += token_logprob(steps.logits(seq.slot), tok)
    tm.sample_s += time.perf_counter() - t0
    if steps.is_eog(tok):
        seq.reason = FinishReason.EOS
        return None
    return tok
