"""One candidate's bookkeeping as its tokens arrive, the same on every runtime: step scores and
StepEvents, the think window, incremental UTF-8 text, stop strings, streaming holdback, length
limits and the finished `Candidate`. What only the runtime knows (the feature and step score of the
token just decoded in the candidate's slot) it reads from the runtime's `Steps`."""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edge_metastone.decode.steps import Steps
from edge_metastone.decode.text import ThinkState, safe_end, stop_match
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
    steps: bool = field(init=False)  # step boundaries matter: scoring or keep_features

    def __post_init__(self) -> None:
        self.think = ThinkState()
        for i, t in enumerate(self.prompt):
            self.think.note(self.rule, t, i)
        self.steps = self.scoring or self.settings.keep_features


class CandidateStream:
    """One candidate from the prompt's last token on, in the runtime's slot `slot`: feed it each
    sampled token with `accept` until `reason` is set, then take its `finish` event."""

    __slots__ = (
        "answer_tokens",
        "confidence",
        "ends",
        "features_by_pos",
        "forced",
        "index",
        "logprobs",
        "note",
        "online",
        "pos",
        "prev",
        "reason",
        "run",
        "runtime",
        "sampler",
        "scores_by_pos",
        "slot",
        "streamed",
        "text",
        "think",
        "thought",
        "tokens",
        "utf8",
        "window_sum",
    )

    def __init__(
        self, index: int, run: CandidateRun, runtime: Steps, slot: int, sampler: object
    ) -> None:
        self.index = index
        self.run = run
        self.runtime = runtime  # the feature and step score of `prev` in `slot`
        self.slot = slot
        self.sampler = sampler  # the runtime's sampler for this candidate
        self.prev = run.prompt[-1]  # last token of the sequence (prompt's last, then generated)
        self.pos = len(run.prompt) - 1  # position of `prev`
        self.tokens: list[int] = []
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.ends: list[int] = []  # len(text) after each token
        self.streamed = 0  # characters of text already sent in TokenEvents
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
        step it closes, extend the text, stream what is safe; sets `reason` when it is the last."""
        run = self.run
        settings = run.settings
        pos = self.pos + 1
        if run.steps and run.rule.is_step_boundary(self.prev, tok):
            self.confidence.close(self.pos, pos - len(run.prompt), self.logprobs)
            feature = self.runtime.feature(self.slot) if settings.keep_features else None
            if feature is not None:
                self.features_by_pos[self.pos] = feature.copy()  # a row of a batch output
            if run.scoring and (score := _step_score(self)) is not None:
                self.scores_by_pos[self.pos] = score
                if self.think.in_window(self.pos):
                    self.online.append(score)
                    yield StepEvent(
                        self.index,
                        self.pos,
                        score,
                        len(self.online),
                        trajectory_score(self.online),
                        self.confidence.by_pos.get(self.pos),
                    )
        if self.think.starts and self.think.end_pos < 0 and tok != run.rule.think_end_id:
            self.thought += 1
        self.think.note(run.rule, tok, pos)
        self.tokens.append(tok)
        run.timings.generated_tokens += 1
        piece = self.utf8.decode(data)
        self.text += piece
        self.ends.append(len(self.text))
        self.prev, self.pos = tok, pos
        if 0 <= self.think.end_pos < pos:
            self.answer_tokens += 1
        cut = stop_match(self.text, len(piece), settings.stop)
        if cut is not None:
            # keep the tokens that end before the stop string: text == their decoding, and no
            # character of the stop string was streamed (it was held back below)
            n = bisect.bisect_right(self.ends, cut)
            del self.tokens[n:], self.ends[n:]
            self.text = self.text[: self.ends[-1] if n else 0]
            self.reason = FinishReason.STOP
            yield TokenEvent(self.index, tok, "")
            return
        safe = safe_end(self.text, self.ends, settings.stop)
        yield TokenEvent(self.index, tok, self.text[self.streamed : safe])
        self.streamed = max(self.streamed, safe)
        over_answer = (
            settings.max_answer_tokens is not None
            and self.answer_tokens >= settings.max_answer_tokens
        )
        if len(self.tokens) >= settings.max_new_tokens or (self.think.end_pos >= 0 and over_answer):
            self.reason = FinishReason.LENGTH

    def finish(self) -> FinishEvent:
        """The finished candidate, with the text not streamed yet."""
        if self.reason is None:
            self.reason = FinishReason.LENGTH
        if self.reason is not FinishReason.STOP:
            self.text += self.utf8.decode(b"", final=True)
            if self.ends:
                self.ends[-1] = len(self.text)
        candidate = _candidate(self)
        return FinishEvent(self.index, candidate, candidate.text[self.streamed :])


def _candidate(seq: CandidateStream) -> Candidate:
    """A finished stream's record: step positions and scores, features, log-probabilities."""
    run = seq.run
    settings = run.settings
    positions: list[int] = []
    steps: list[float] = []
    score: float | None = None
    features: np.ndarray | None = None
    if run.steps:
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
        text=seq.text,
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
    score = seq.runtime.step_score(seq.slot)
    if score is not None and not math.isfinite(score):
        raise EdgeMetastoneError(
            f"the model produced a non-finite step score at token {seq.pos} "
            "(its weights or head are broken)"
        )
    seq.run.timings.score_s += time.perf_counter() - t0
    return score
