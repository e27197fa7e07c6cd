"""`/v1/completions`: a raw prompt (the CLI's `--raw`: fed as it is, control markup parsed, the
model's own BOS) and OpenAI's `text_completion` objects, with the chat route's effort/strategy
extensions and `metastone` field. A choice's `text` is the candidate's whole generated text, as
written (think markup included), as llama-server's completion returns it.

A stream sends, as chat's does, the engine's events in `metastone.events` as they happen (with
empty `text`: the candidates are compared only when they have finished), then the chosen
candidate's text with `metastone.result`, its finish, the other choices (`n`), the usage chunk
when `stream_options.include_usage` asks for it, and `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from edge_metastone.options import ReasonResult
from edge_metastone.server.schema import (
    choice_finish,
    choices,
    event_json,
    extension,
    finish_reason,
    ranked,
    usage,
)
from edge_metastone.server.streaming import EventStream
from edge_metastone.types import Event


class TextCompletion:
    """Builds one text request's response objects (shared id, creation time, model name)."""

    def __init__(self, model: str, n: int = 1) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.n = n

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def response(self, result: ReasonResult, seed: int, *, capped: bool = False) -> dict[str, Any]:
        """The non-streaming `text_completion` object: n choices, the chosen one first."""
        return {
            **self._head(),
            "choices": choices(result, self.n, lambda c: {"text": c.text}),
            "usage": usage(result),
            "metastone": extension(result, seed, capped=capped),
        }

    def chunk(
        self,
        text: str = "",
        *,
        finish: str | None = None,
        index: int = 0,
        choices: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        """One streamed `text_completion` object (`extra`: `usage`, `metastone`)."""
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head(), "choices": [choice] if choices else [], **extra}


class TextEventStream(EventStream):
    """A text completion's stream (see the module's docstring); the transport is chat's."""

    completion: TextCompletion

    def _opening(self) -> list[dict[str, Any]]:
        return []  # a text completion has no role chunk

    def _progress(self, events: list[Event]) -> dict[str, Any] | None:
        if not events:
            return None
        return self.completion.chunk(metastone={"events": [event_json(e) for e in events]})

    def _ending(self, item: ReasonResult) -> list[dict[str, Any]]:
        c = self.completion
        result = extension(item, self.job.options.seed, capped=self.job.capped)
        out = [c.chunk(item.chosen_candidate.text, metastone={"events": [], "result": result})]
        out.append(c.chunk(finish=finish_reason(item)))
        for i, cand in enumerate(ranked(item, c.n)[1:], start=1):
            out.append(c.chunk(cand.text, index=i))
            out.append(c.chunk(finish=choice_finish(cand), index=i))
        if self.include_usage:
            out.append(c.chunk(choices=False, usage=usage(item)))
        return out
