"""One candidate's bookkeeping as its tokens arrive, the same on every runtime: step scores and
StepEvents, the think window, incremental UTF-8 text, stop strings, streaming holdback, length
limits and the finished `Candidate`. What only the runtime knows (the feature and step score of the
token just decoded in the candidate's slot) it reads from the runtime's `Slots`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_metastone.decode.slots import Slots
from edge_metastone.decode.text import StreamText, ThinkState
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.sprm import StepRule, trajectory_score
from edge_metastone.types import (
    Candidate,
    Event,
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    StepEvent,
    Timings,
    TokenEvent,
)


def token_logprob(logits: np.ndarray, tok: int) -> float:
    """log softmax(logits)[tok] for logits [V], in float64."""
    logits = logits.astype(np.float64)
    m = logits.max()
    return float(logits[tok] - m - np.log(np.exp(logits - m).sum()))


class StepConfidence:
    """The model's own confidence in each reasoning step: the geometric mean probability of the
    step's tokens (exp of their mean log-probability), from the step's first token through its
    delimiter. Needs `settings.logprobs`; a step in the prompt has none."""

    __slots__ = ("by_pos", "start")

    def __init__(self) -> None:
        self.by_pos: dict[int, float] = {}  # scored position -> confidence
        self.start = 0  # index (among generated tokens) of the current step's first token

    def close(self, scored_pos: int, delimiter: int, logprobs: list[float]) -> None:
        """A step boundary: the step scored at `scored_pos` ends with generated token `delimiter`;
        `logprobs` holds the generated tokens' log-probabilities through it (or is empty)."""
        part = logprobs[self.start : delimiter + 1]
        if part and len(logprobs) > delimiter:
            self.by_pos[scored_pos] = math.exp(sum(part) / len(part))
        self.start = delimiter + 1

    def of(self, positions: list[int]) -> list[float | None]:
        """The confidences of the steps scored at `positions` (None for a step in the prompt)."""
        return [self.by_pos.get(p) for p in positions]


@dataclass
class CandidateRun:
    """What the candidates of one generate() call share: the prompt, its step scores and features,
    the settings and the call's timings."""

    prompt: list[int]
    rule: StepRule
    settings: GenerationSettings
    scoring: bool  # score steps in-stream: settings.score_steps and the model has a head
    timings: Timings
    feature_width: int  # C of a step feature (the shape of an empty step_features)
    prompt_scores: dict[int, float]  # the prompt's step boundaries -> score (scoring)
    prompt_features: dict[int, np.ndarray]  # the prompt's step boundaries -> feature
    think: ThinkState = field(init=False)  # the window as the prompt leaves it
    marks_steps: bool = field(init=False)  # reasoning-step boundaries matter: scoring or features

    def __post_init__(self) -> None:
        self.think = ThinkState()
        for i, t in enumerate(self.prompt):
            self.think.note(self.rule, t, i)
        self.marks_steps = self.scoring or self.settings.keep_features


class CandidateStream:
    """One candidate from the prompt's last token on, in the runtime's slot `slot`: feed it each
    sampled token with `accept` until `reason` is set, then take its `finish` event."""

    __slots__ = (
        "answer_tokens",
        "confidence",
        "features_by_pos",
        "forced",
        "index",
        "logprobs",
        "note",
        "online",
        "out",
        "pos",
        "prev",
        "reason",
        "run",
        "sampler",
        "scores_by_pos",
        "slot",
        "slots",
        "think",
        "thought",
        "tokens",
        "window_sum",
    )

    def __init__(
        self, index: int, run: CandidateRun, slots: Slots, slot: int, sampler: object
    ) -> None:
        self.index = index
        self.run = run
        self.slots = slots  # the feature and step score of `prev` in `slot`
        self.slot = slot
        self.sampler = sampler  # the runtime's sampler for this candidate
        self.prev = run.prompt[-1]  # last token of the sequence (prompt's last, then generated)
        self.pos = len(run.prompt) - 1  # position of `prev`
        self.tokens: list[int] = []
        self.out = StreamText()  # its text, stop strings and what was streamed
        self.scores_by_pos = dict(run.prompt_scores)
        self.features_by_pos = dict(run.prompt_features) if run.settings.keep_features else {}
        self.online: list[float] = []
        self.think = dataclasses.replace(run.think)
        self.answer_tokens = 0
        self.thought = 0  # tokens written inside the think window (the thinking budget's count)
        self.forced: list[int] | None = None  # the end of its thought being written (budget)
        self.logprobs: list[float] = []  # each scored token's log-probability (settings.logprobs)
        self.window_sum = 0.0  # of the last `control.window` of them
        self.note = ""  # why it stopped early
        self.confidence = StepConfidence()  # each step's own confidence (settings.logprobs)
        self.reason: FinishReason | None = None

    def halted(self, control: GenerationControl) -> bool:
        """Finish as halted or pruned when `control` says so; True when it did."""
        if control.halted:
            self.reason, self.note = FinishReason.HALTED, control.halt_note
            return True
        if self.index in control.pruned:
            self.reason = FinishReason.PRUNED
            self.note = control.prune_notes.get(self.index, "")
            return True
        return False

    def scored(self, logprob: float, w: int, floor: float | None) -> bool:
        """Record the log-probability of the token just sampled; True when the running
        confidence (its mean over the last `w` tokens) fell below `floor`: the candidate is then
        pruned (online termination; `GenerationControl.min_confidence`)."""
        self.logprobs.append(logprob)
        self.window_sum += logprob - (self.logprobs[-w - 1] if len(self.logprobs) > w else 0.0)
        if floor is None or len(self.logprobs) < w or self.window_sum / w >= floor:
            return False
        self.reason = FinishReason.PRUNED
        self.note = (
            f"low confidence: mean log-probability {self.window_sum / w:.2f} over its last {w} "
            f"tokens, below {floor:.2f}"
        )
        return True

    def accept(self, tok: int, data: bytes) -> Iterator[Event]:
        """Take the sampled token `tok` (not end-of-generation), whose bytes are `data`: score the
        reasoning step it closes, note the think window, extend the text, stream what is safe,
        and check the limits; sets `reason` when it is the last."""
        run = self.run
        pos = self.pos + 1
        if run.marks_steps and run.rule.is_step_boundary(self.prev, tok):
            yield from _close_step(self, pos)
        if self.think.starts and self.think.end_pos < 0 and tok != run.rule.think_end_id:
            self.thought += 1
        self.think.note(run.rule, tok, pos)
        self.tokens.append(tok)
        run.timings.generated_tokens += 1
        piece = self.out.add(data)
        self.prev, self.pos = tok, pos
        if 0 <= self.think.end_pos < pos:
            self.answer_tokens += 1
        kept = self.out.stop(piece, run.settings.stop)
        if kept is not None:  # the tokens before the stop string: the text is their decoding
            del self.tokens[kept:]
            self.reason = FinishReason.STOP
            yield TokenEvent(self.index, tok, "")
            return
        text, end = self.out.unsent(run.settings.stop)
        yield TokenEvent(self.index, tok, text)
        self.out.sent(end)
        if _over_length(self):
            self.reason = FinishReason.LENGTH

    def finish(self) -> FinishEvent:
        """The finished candidate, with the text not streamed yet."""
        if self.reason is None:
            self.reason = FinishReason.LENGTH
        if self.reason is not FinishReason.STOP:
            self.out.flush()
        candidate = _candidate(self)
        return FinishEvent(self.index, candidate, candidate.text[self.out.streamed :])


def _close_step(seq: CandidateStream, pos: int) -> Iterator[StepEvent]:
    """The token at `pos` closes the reasoning step scored at `seq.pos`: its confidence, its
    feature (kept), its head score, and a StepEvent when the step counts online (SPEC §1)."""
    run = seq.run
    seq.confidence.close(seq.pos, pos - len(run.prompt), seq.logprobs)
    feature = seq.slots.feature(seq.slot) if run.settings.keep_features else None
    if feature is not None:
        seq.features_by_pos[seq.pos] = feature.copy()  # a row of a batch output
    if run.scoring and (score := _step_score(seq)) is not None:
        seq.scores_by_pos[seq.pos] = score
        if seq.think.in_window(seq.pos):
            seq.online.append(score)
            yield StepEvent(
                seq.index,
                seq.pos,
                score,
                len(seq.online),
                trajectory_score(seq.online),
                seq.confidence.by_pos.get(seq.pos),
            )


def _over_length(seq: CandidateStream) -> bool:
    """`max_new_tokens` reached, or (its thought ended) `max_answer_tokens`."""
    settings = seq.run.settings
    over_answer = (
        settings.max_answer_tokens is not None and seq.answer_tokens >= settings.max_answer_tokens
    )
    return len(seq.tokens) >= settings.max_new_tokens or (seq.think.end_pos >= 0 and over_answer)


def _candidate(seq: CandidateStream) -> Candidate:
    """A finished stream's record: step positions and scores, features, log-probabilities."""
    run = seq.run
    settings = run.settings
    positions: list[int] = []
    steps: list[float] = []
    score: float | None = None
    features: np.ndarray | None = None
    if run.marks_steps:
        positions = run.rule.scored_positions(run.prompt + seq.tokens)
    if run.scoring:
        steps = [seq.scores_by_pos[p] for p in positions]
        score = trajectory_score(steps)
    if settings.keep_features:
        rows = [seq.features_by_pos[p] for p in positions]
        features = np.stack(rows) if rows else np.empty((0, run.feature_width), np.float32)
    lps = seq.logprobs
    return Candidate(
        index=seq.index,
        token_ids=list(seq.tokens),
        text=seq.out.text,
        step_positions=positions,
        step_scores=steps,
        score=score,
        finish_reason=seq.reason,
        mean_logprob=sum(lps) / len(lps) if settings.logprobs and lps else None,
        step_features=features,
        token_logprobs=list(lps) if settings.logprobs else None,
        stop_note=seq.note,
        step_confidence=seq.confidence.of(positions) if settings.logprobs else [],
        thought_ended=seq.forced is not None,
    )


def forced_token(seq: CandidateStream) -> int | None:
    """The token written for `seq` instead of a sampled one: its thinking budget is spent
    (`settings.think_budget` tokens inside the open think window), so its thought is ended for
    it, a token a step (`settings.think_close`, then `</think>`). None: sample as usual."""
    run = seq.run
    budget = run.settings.think_budget
    if seq.forced is None:
        think = seq.think
        if budget is None or not think.starts or think.end_pos >= 0 or seq.thought < budget:
            return None
        seq.forced = [*run.settings.think_close, run.rule.think_end_id]
    return seq.forced.pop(0) if seq.forced else None


def _step_score(seq: CandidateStream) -> float | None:
    """The head's score of the step `seq`'s last token ends, checked finite."""
    t0 = time.perf_counter()
    score = seq.slots.step_score(seq.slot)
    if score is not None and not math.isfinite(score):
        raise EdgeMetastoneError(
            f"the model produced a non-finite step score at token {seq.pos} "
            "(its weights or head are broken)"
        )
    seq.run.timings.score_s += time.perf_counter() - t0
    return score
