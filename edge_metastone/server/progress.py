"""What a chat client sees of a request while it runs, and the thinking it gets at the end.

A reasoning model's thinking goes in `reasoning_content` (DeepSeek's API, vLLM's reasoning
parsers and llama-server do the same; Open WebUI, LiteLLM, LangChain and LobeChat show it as a
collapsible "thinking" block), the answer after it in `content`. Several candidates think at once
here and the selector picks one only when they have finished, so a stream cannot send the chosen
thought as it is written. It sends what stays true instead, as `reasoning_content` deltas: a first
line at once, each wave as it starts, each candidate's answer and score as it finishes and which
has the highest SPRM score so far (the selector still decides at the end), a line of progress
every few seconds while they think; then the chosen candidate's thought (after a blank line), and
its answer as `content`.
"""

from __future__ import annotations

import math
import time

from edge_metastone.answers import THINK_END, extract_answer
from edge_metastone.options import CandidateView, ReasonResult
from edge_metastone.sprm import THINK_START
from edge_metastone.types import Event, FinishEvent, TokenEvent, WaveEvent

HEARTBEAT_S = 2.0  # a progress line at least this often while candidates think


def split_thinking(text: str, thinks: bool) -> tuple[str | None, str]:
    """(reasoning_content, content) of a candidate's text: the thought inside the think markup
    (a `<think>` the model wrote itself removed) and the answer after `</think>`; a candidate cut
    off while thinking has all its text as thought and no answer. A model without think markup
    (`thinks` false) has no reasoning_content, unless its text has a `</think>` all the same
    (split there, as vLLM's reasoning parsers split the text)."""
    if not thinks and THINK_END not in text:
        return None, text.strip()
    thought, sep, answer = text.rpartition(THINK_END)
    if not sep:
        thought, answer = text, ""
    thought = thought.strip()
    if thought.startswith(THINK_START):
        thought = thought[len(THINK_START) :].strip()
    return thought, answer.strip()


def message(c: CandidateView, thinks: bool) -> dict[str, str]:
    """A choice's `message`: the answer as `content`, the thought as `reasoning_content`."""
    thought, answer = split_thinking(c.text, thinks)
    out = {"role": "assistant", "content": answer}
    if thought is not None:
        out["reasoning_content"] = thought
    return out


def _score(x: float | None) -> str:
    return f"{x:.3g}" if x is not None and math.isfinite(x) else "n/a"  # a weak head's are ~1e-4


class Progress:
    """The progress lines of one streamed request (see the module's docstring)."""

    def __init__(self, effort: str) -> None:
        self.effort = effort
        self.scores: dict[int, float] = {}
        self.tokens = 0
        self.finished = 0
        self.started = False
        self.last = time.monotonic()

    def lines(self, events: list[Event]) -> str:
        """The lines these events add (with a heartbeat when nothing else was said a while)."""
        out = []
        if not self.started:
            self.started = True
            out.append(
                f"Thinking with several candidates at once (effort {self.effort}); the best one "
                "is chosen when they finish.\n"
            )
        for ev in events:
            if isinstance(ev, TokenEvent):
                self.tokens += 1
            elif isinstance(ev, WaveEvent) and ev.phase == "start":
                out.append(f"Wave {ev.wave}: {ev.size} candidates.\n")
            elif isinstance(ev, FinishEvent):
                out.append(self._finished(ev))
        now = time.monotonic()
        if not out and now - self.last >= HEARTBEAT_S:
            out.append(f"... {self.tokens} tokens written, {self.finished} candidates done.\n")
        if out:
            self.last = now
        return "".join(out)

    def _finished(self, ev: FinishEvent) -> str:
        self.finished += 1
        c, r = ev.candidate, ev.result
        answer = extract_answer(r.text) or "(none)"
        line = f"Candidate {c} finished ({r.n_tokens} tokens, {r.finish_reason.value}): answer {answer!r}"
        if r.score is not None and math.isfinite(r.score):
            self.scores[c] = r.score
            lead = max(self.scores, key=lambda i: self.scores[i])
            line += (
                f", SPRM score {_score(r.score)}; the highest so far: candidate {lead} "
                f"({_score(self.scores[lead])}; the selector decides at the end)"
            )
        return line + ".\n"

    @staticmethod
    def closing(result: ReasonResult, thinks: bool) -> str:
        """The last reasoning_content: which candidate was chosen and by what, then its thought."""
        c = result.chosen_candidate
        thought, _ = split_thinking(c.text, thinks)
        head = f"Chosen: candidate {c.index} ({result.strategy}, of {result.k})."
        return head + (f"\n\n{thought}" if thought else "")
