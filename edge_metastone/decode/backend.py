"""`DecodingBackend`: what both runtimes' backends share behind `edge_metastone.backend.Backend`:
the chat encoding, stop strings in the tokenizer's normal form, and `generate` through the one
decode loop. A runtime's backend adds its model, tokenizer, `open_slots` and scoring."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

from edge_metastone.backend import generate_all
from edge_metastone.chat import ChatTemplate, PromptFormat, dedupe_bos, encode_chat
from edge_metastone.decode.loop import decode_loop
from edge_metastone.decode.slots import Slots
from edge_metastone.normalization import NormalForm, normalize
from edge_metastone.sprm import StepRule
from edge_metastone.types import (
    Event,
    GenerationControl,
    GenerationRequest,
    GenerationSettings,
    SamplingSettings,
    Timings,
)


class DecodingBackend:
    """The shared half of a backend; a subclass sets the attributes below and `open_slots`."""

    template: ChatTemplate
    rule: StepRule
    normalizer: NormalForm | None  # the tokenizer's normal form of text (stop strings match in it)
    control_texts: tuple[str, ...]  # control tokens' spellings (kept as they are by normalizing)
    tokenize: Callable[[str], list[int]]  # pre-rendered text, control-token markup parsed
    tokenize_text: Callable[[str], list[int]]  # plain text: markup stays text
    prompt_format: PromptFormat  # how chat prompts are written (the file's template, ...)
    bos_id: int | None  # a BOS the chat encoding never doubles (None: nothing to check)

    @property
    def has_head(self) -> bool:
        """True when the model scores steps."""
        raise NotImplementedError

    @property
    def n_ctx(self) -> int:
        """The model's context length."""
        raise NotImplementedError

    def open_slots(
        self,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
        control: GenerationControl | None = None,
    ) -> Slots:
        """One generation's slots on this runtime (`edge_metastone.decode.slots.SlotSource`)."""
        raise NotImplementedError

    @property
    def busy_sequences(self) -> int:
        """Sequences other requests decode now (a runtime that runs one at a time: 0)."""
        return 0

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a conversation, by the model's own (sandboxed) chat template."""
        return self.template.render(messages, add_generation_prompt=True)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        """The prompt text and ids for a conversation. Only the template's own markup becomes
        control tokens: text in a message that spells one (`<|im_end|>`, `<think>`) stays text."""
        text, ids = encode_chat(
            self.render,
            messages,
            tokenize=self.tokenize,
            tokenize_text=self.tokenize_text,
            control_texts=self.control_texts,
            normalize=self._normalize,
        )
        return text, dedupe_bos(ids, self.bos_id)

    def _normalize(self, text: str) -> str:
        """`text` in the tokenizer's normal form, control tokens' spellings kept as they are."""
        return normalize(text, self.normalizer, self.control_texts)

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
        """Stream events for k candidates generated as one batch. Stop strings are matched in the
        tokenizer's normal form, the form the model reads and writes."""
        if settings.stop and self.normalizer is not None:
            form, keep = self.normalizer, self.control_texts
            stop = tuple(normalize(s, form, keep) for s in settings.stop)
            settings = dataclasses.replace(settings, stop=stop)
        req = GenerationRequest(list(prompt_ids), k, sampling, settings, candidate_offset)
        return decode_loop(self, req, control or GenerationControl())

    # `backend.generate_all(self, ...)` as a method: run to the end, candidates in index order
    generate_all = generate_all

    def close(self) -> None:
        """Free the model."""
        raise NotImplementedError

    def __enter__(self) -> DecodingBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
