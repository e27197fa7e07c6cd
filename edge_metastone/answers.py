"""Final answers: the text after `</think>`, its last `\\boxed{...}`, and equivalence via math-verify."""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

logger = logging.getLogger(__name__)

THINK_END = "</think>"
MAX_ANSWER_CHARS = 200  # an answer is a short string: never kilobytes of text for math-verify
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    for macro in ("\\boxed", "\\fbox"):
        start = text.rfind(macro + "{")
        if start < 0:
            continue
        i = start + len(macro) + 1
        depth = 1
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j].strip()
        return None  # unbalanced: the candidate was cut inside the box
    return None


def extract_answer(text: str) -> str:
    """The candidate's answer, at most 200 characters: after the last `</think>` (all text if
    none), its last `\\boxed{}`; without one, the last number; without a number, the text."""
    tail = text.rsplit(THINK_END, 1)[-1] if THINK_END in text else text
    boxed = _last_boxed(tail)
    if boxed is not None:
        return boxed[:MAX_ANSWER_CHARS]
    numbers = _NUMBER.findall(tail[-4 * MAX_ANSWER_CHARS :])
    if numbers:
        return numbers[-1]
    return tail.strip()[:MAX_ANSWER_CHARS].strip()


def _timeouts() -> dict[str, Any]:
    # math-verify times out through SIGALRM, which only the main thread may use.
    if threading.current_thread() is threading.main_thread():
        return {}
    return {"parsing_timeout": None}


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> Any:
    from math_verify import parse

    # math-verify looks for LaTeX/expressions; wrap bare answers so "1/2" and "\\frac12" both parse
    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    return parse(text, **_timeouts())


def answers_equivalent(a: str, b: str) -> bool:
    """True when two extracted answers are mathematically equal (math-verify), or equal as text."""
    if a.strip() == b.strip():
        return True
    if not a.strip() or not b.strip():
        return False
    from math_verify import verify

    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    kwargs = {} if not _timeouts() else {"timeout_seconds": None}
    try:
        return bool(verify(pa, pb, **kwargs))
    except Exception as e:  # math-verify can raise on exotic expressions; treat as not equal
        logger.debug("math-verify failed on %r vs %r: %s", a, b, e)
        return False


def group_answers(answers: list[str]) -> list[int]:
    """Equivalence-class label per answer (label = index of the class's first member)."""
    labels: list[int] = []
    reps: list[int] = []
    for i, ans in enumerate(answers):
        for r in reps:
            if answers_equivalent(answers[r], ans):
                labels.append(r)
                break
        else:
            reps.append(i)
            labels.append(i)
    return labels
