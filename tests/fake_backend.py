"""A scripted backend implementing `edge_metastone.backend.Backend` without any runtime: search
strategies and the whole `Reasoner` run on it in tests, with hand-chosen step scores."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_metastone.chat import PromptFormat
from edge_metastone.kvpolicy import resolve_layout
from edge_metastone.sprm import StepRule, trajectory_score
from edge_metastone.types import (
    Candidate,
    Event,
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    ModelFacts,
    PolicyKeys,
    SamplingSettings,
    ScoreResult,
    StepEvent,
    TokenEvent,
    WaveEvent,
)

EOS = 0
FACTS = ModelFacts(
    weight_bytes=1 << 20,
    n_layers=4,
    n_kv_heads=2,
    head_dim=16,
    n_embd=64,
    n_ff=128,
    n_heads=4,
    n_vocab=256,
    n_ctx_train=4096,
)


@dataclass
class Script:
    """One fake candidate: its step scores (one step every `every` tokens) and final text."""

    steps: list[float]
    text: str = "</think> \\boxed{1}"
    every: int = 10
    logprob: float = -1.0

    @property
    def n_tokens(self) -> int:
        return len(self.steps) * self.every

    def piece(self, j: int) -> str:
        """The text of generated token j (the text spread evenly over the tokens)."""
        n, t = self.n_tokens, self.text
        return t[j * len(t) // n : (j + 1) * len(t) // n]


class FakeBackend:
    """Emits events in the real engine's order, honouring control: each round, every live
    candidate advances one token (a step boundary's StepEvent comes before that token's
    TokenEvent); the FinishEvents of the candidates that ended come after the round. Candidate i
    plays `scripts[i % len(scripts)]`. Text is tokenized one byte per token."""

    def __init__(
        self,
        scripts: Sequence[Script],
        has_head: bool = True,
        round_s: float = 0.0,
        path: Path | str = "fake.gguf",
        default_strategy: str | None = None,
    ) -> None:
        self.scripts = list(scripts)
        self._has_head = has_head
        self.round_s = round_s  # a decode step's duration
        self.generated = 0
        self.calls = 0
        self.prefills = 0  # prompt passes (one per generate call, whatever its waves)
        self.settings_seen: list[GenerationSettings] = []
        self.live_generations = 0  # > 0 while a generation runs (close() must never see that)
        self.closed = False
        self._path = Path(path)
        self._default_strategy = default_strategy

    # --- facts ---------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def runtime(self) -> str:
        return "fake"

    @property
    def facts(self) -> ModelFacts:
        return FACTS

    @property
    def has_head(self) -> bool:
        return self._has_head

    # the recorded keys a test sets (metastone.adaptive, .thinking_scaling, .selector)
    adaptive: str | None = None
    thinking_scaling: str | None = None
    selector: str | None = None

    @property
    def policy_keys(self) -> PolicyKeys:
        return PolicyKeys(
            self._default_strategy, self.adaptive, self.selector, self.thinking_scaling
        )

    @property
    def rule(self) -> StepRule:
        return StepRule.of([ord(".")], -1, -1)

    @property
    def feature_layer(self) -> int:
        return FACTS.n_layers - 2

    kv_layouts = (KVLayout.UNIFIED, KVLayout.STREAMS)
    busy_sequences = 0  # one request at a time
    kv_types = (KVType.F16, KVType.Q8_0)

    @property
    def eog_ids(self) -> tuple[int, ...]:
        return (EOS,)

    # --- text ------------------------------------------------------------------------------
    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        turns = "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        return turns + "[assistant]"

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    prompt_format = PromptFormat("fake", "file", "the file's chat template")

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.tokenize(text)  # a byte vocabulary: no BOS

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        text = self.render(messages)
        return text, self.tokenize(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    # --- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        control: GenerationControl | None = None,
        candidate_offset: int = 0,
    ) -> Iterator[Event]:
        assert not self.closed, "generate() on a closed backend"
        control = control or GenerationControl()
        self.calls += 1
        self.settings_seen.append(settings)
        self.live_generations += 1
        t0 = time.perf_counter()
        control.timings.kv_layout = resolve_layout(
            settings.kv_layout, k, len(prompt_ids), settings.max_new_tokens
        ).value
        control.timings.kv_type = settings.kv_type.value
        try:
            yield from self._waves(list(prompt_ids), k, settings, control, candidate_offset)
        finally:
            self.live_generations -= 1
            control.timings.prompt_tokens += len(prompt_ids)
            control.timings.total_s += time.perf_counter() - t0

    def _waves(
        self,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        control: GenerationControl,
        offset: int,
    ) -> Iterator[Event]:
        """The real loop's waves: a WaveEvent "start"/"end" around each wave when
        `settings.max_candidates` allows more than k, and more while the caller extends."""
        capacity = max(k, settings.max_candidates or k)
        started, size = 0, k
        self.prefills += 1
        while True:
            control.timings.waves += 1
            if capacity > k:
                yield WaveEvent(control.timings.waves, "start", size, started + size)
            yield from self._run(prompt, size, settings, control, offset + started)
            started += size
            if started >= capacity or control.halted:
                return
            yield WaveEvent(control.timings.waves, "end", size, started)
            size = min(control.requested, capacity - started)
            control.requested = 0
            if size <= 0 or control.halted:
                return

    def _run(
        self,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        control: GenerationControl,
        offset: int,
    ) -> Iterator[Event]:
        idx = [offset + i for i in range(k)]
        scripts = {c: self.scripts[c % len(self.scripts)] for c in idx}
        live = list(idx)
        made = dict.fromkeys(idx, 0)
        step_no = dict.fromkeys(idx, 0)
        text = dict.fromkeys(idx, "")
        ids: dict[int, list[int]] = {c: [] for c in idx}
        while live:
            ended: list[tuple[int, FinishReason]] = []
            for i in live:
                s = scripts[i]
                reason = None
                if control.halted:
                    reason = FinishReason.HALTED
                elif i in control.pruned:
                    reason = FinishReason.PRUNED
                elif made[i] >= s.n_tokens:
                    reason = FinishReason.EOS
                elif made[i] >= settings.max_new_tokens:
                    reason = FinishReason.LENGTH
                if reason is not None:
                    ended.append((i, reason))
                    continue
                piece = s.piece(made[i])
                made[i] += 1
                self.generated += 1
                control.timings.generated_tokens += 1
                if made[i] % s.every == 0 and self.has_head and settings.score_steps:
                    step_no[i] += 1
                    sc = s.steps[step_no[i] - 1]
                    yield StepEvent(
                        i,
                        len(prompt) + made[i],
                        sc,
                        step_no[i],
                        trajectory_score(s.steps[: step_no[i]]),
                    )
                text[i] += piece
                ids[i].append(ord(piece[0]) if piece else 1)
                yield TokenEvent(i, ids[i][-1], piece)
            for i, reason in ended:
                s = scripts[i]
                steps = s.steps[: step_no[i]]
                scored = self.has_head and settings.score_steps
                yield FinishEvent(
                    i,
                    Candidate(
                        i,
                        ids[i],
                        text[i],
                        [len(prompt) + (j + 1) * s.every for j in range(len(steps))]
                        if scored
                        else [],
                        steps if scored else [],
                        trajectory_score(steps) if scored else None,
                        reason,
                        s.logprob if settings.logprobs else None,
                        token_logprobs=[s.logprob] * (len(ids[i]) + 1)
                        if settings.logprobs
                        else None,
                    ),
                )
                live.remove(i)
            if live:
                control.timings.decode_steps += 1
            if self.round_s:
                time.sleep(self.round_s)

    def score_tokens(self, token_ids: Sequence[int]) -> ScoreResult:
        positions = [i for i, t in enumerate(token_ids) if t == ord(".")]
        steps = [0.5] * len(positions)
        return ScoreResult(
            positions, steps, trajectory_score(steps), len(token_ids), list(token_ids)
        )

    def score_text(self, text: str) -> ScoreResult:
        return self.score_tokens(self.tokenize(text))

    def close(self) -> None:
        assert self.live_generations == 0, "close() while a generation is running"
        self.closed = True
