"""Runtime-neutral pieces of streaming one candidate: the think window seen so far, its text as
the tokens arrive, stop-string matching and how much text may be streamed. Every backend's generator shares them, so stop strings
and the SPEC §1 window behave the same on every runtime."""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from edge_metastone.sprm import StepRule


@dataclass
class ThinkState:
    """Where `<think>` / `</think>` occurred so far: the provisional SPEC §1 window."""

    starts: int = 0
    start_pos: int = -1
    end_pos: int = -1

    def note(self, rule: StepRule, token: int, pos: int) -> None:
        """Account for `token` at position `pos`."""
        if token == rule.think_start_id:
            self.starts += 1
            self.start_pos = pos
        elif token == rule.think_end_id and self.end_pos < 0:
            self.end_pos = pos

    def in_window(self, pos: int) -> bool:
        """True when a step scored at feature position `pos` counts online (SPEC §1, so far)."""
        start = self.start_pos if self.starts == 1 else 0
        return pos >= start + 1 and self.end_pos < 0


def stop_match(text: str, new: int, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string that the last `new` characters completed begins."""
    hits = [
        i for stop in stops if (i := text.find(stop, max(0, len(text) - new - len(stop) + 1))) >= 0
    ]
    return min(hits) if hits else None


def safe_end(text: str, ends: Sequence[int], stops: Sequence[str]) -> int:
    """How much of `text` may be streamed: up to the last token boundary (`ends`: len(text) after
    each token) before any suffix that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if stop.startswith(text[len(text) - k :]):
                hold = k
                break
    if hold == 0:
        return len(text)
    limit = len(text) - hold
    n = bisect.bisect_right(ends, limit)
    return ends[n - 1] if n else 0


class StreamText:
    """A candidate's text as its tokens arrive: decoded incrementally as UTF-8 (a character split
    across tokens waits for its last byte), where each token's text ends, the stop strings, and
    how much has been streamed (never what could still grow into a stop string)."""

    __slots__ = ("ends", "streamed", "text", "utf8")

    def __init__(self) -> None:
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.ends: list[int] = []  # len(text) after each token
        self.streamed = 0  # characters of text already sent

    def add(self, data: bytes) -> str:
        """Append one token's bytes; returns the characters they completed."""
        piece = self.utf8.decode(data)
        self.text += piece
        self.ends.append(len(self.text))
        return piece

    def stop(self, piece: str, stops: Sequence[str]) -> int | None:
        """When the last token's `piece` completed a stop string: cut the text before it, to the
        tokens that end before it, and return how many tokens are kept (None: no stop string).
        No character of the stop string was streamed (`unsent` held it back)."""
        cut = stop_match(self.text, len(piece), stops)
        if cut is None:
            return None
        n = bisect.bisect_right(self.ends, cut)
        del self.ends[n:]
        self.text = self.text[: self.ends[-1] if n else 0]
        return n

    def unsent(self, stops: Sequence[str]) -> tuple[str, int]:
        """(the text that is safe to stream and not sent yet, where it ends): mark it sent with
        `sent`."""
        safe = safe_end(self.text, self.ends, stops)
        return self.text[self.streamed : safe], safe

    def sent(self, end: int) -> None:
        """The text up to `end` was streamed."""
        self.streamed = max(self.streamed, end)

    def flush(self) -> None:
        """The last token came: a dangling partial character becomes U+FFFD."""
        self.text += self.utf8.decode(b"", final=True)
        if self.ends:
            self.ends[-1] = len(self.text)
