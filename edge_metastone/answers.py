"""Final answers: the text after `</think>`, its last `\\boxed{...}`, and equivalence via math-verify."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

THINK_END = "</think>"
MAX_ANSWER_CHARS = 200  # an answer is a short string: never kilobytes of text for math-verify
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_INTEGER = re.compile(r"[+-]?\d{1,100}")


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


CHECK_TIMEOUT_S = 5.0  # one answer check (or one vote's grouping) off the main thread


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> Any:
    from math_verify import parse

    # math-verify looks for LaTeX/expressions; wrap bare answers so "1/2" and "\\frac12" both parse
    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    return parse(text)


def _equivalent_here(a: str, b: str) -> bool:
    """math-verify in this process; its own SIGALRM time limits hold in the main thread only."""
    from math_verify import verify

    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    try:
        return bool(verify(pa, pb))
    except Exception as e:  # math-verify can raise on exotic expressions; treat as not equal
        logger.debug("math-verify failed on %r vs %r: %s", a, b, e)
        return False


def _group_here(answers: list[str]) -> list[int]:
    labels: list[int] = []
    reps: list[int] = []
    for i, ans in enumerate(answers):
        for r in reps:
            quick = _trivially(answers[r], ans)
            if quick or (quick is None and _equivalent_here(answers[r], ans)):
                labels.append(r)
                break
        else:
            reps.append(i)
            labels.append(i)
    return labels


def _trivially(a: str, b: str) -> bool | None:
    """Equal as text (True), one empty (False), two integers (compared), or undecided (None)."""
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    if not a or not b:
        return False
    if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b):  # math-verify costs ~20 ms a pair
        return int(a) == int(b)
    return None


WARM_TIMEOUT_S = 120.0  # starting the checker's process (imports included): never a check's time


def _ready() -> bool:
    """The worker's first task: importing math-verify, so a check never pays for it."""
    from math_verify import parse  # noqa: F401

    return True


class FallbackCounter:
    """Answer checks that fell back to comparing text (time limit, or the checker died)."""

    def __init__(self) -> None:
        self.n = 0


_counter: contextvars.ContextVar[FallbackCounter | None] = contextvars.ContextVar(
    "answer_check_fallbacks", default=None
)


@contextlib.contextmanager
def counting_fallbacks() -> Iterator[FallbackCounter]:
    """Count the answer checks that fall back to text equality inside the block (this thread)."""
    counter = FallbackCounter()
    token = _counter.set(counter)
    try:
        yield counter
    finally:
        _counter.reset(token)


def _fell_back() -> None:
    counter = _counter.get()
    if counter is not None:
        counter.n += 1


class _Checker:
    """A one-process pool that runs math-verify with a hard time limit for threads other than
    the main one (a server's, a stream's): a pathological answer costs at most CHECK_TIMEOUT_S,
    then the worker is killed and the check falls back to comparing text (counted:
    `counting_fallbacks`). The worker is started and warmed (math-verify imported) before the
    first check is timed, and kept: a check's limit never includes starting a process."""

    def __init__(self, initializer: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._pool = None
        self._initializer = initializer

    def _warm_pool(self):
        import concurrent.futures as cf
        import multiprocessing

        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(
                max_workers=1, mp_context=ctx, initializer=self._initializer
            )
            try:
                pool.submit(_ready).result(timeout=WARM_TIMEOUT_S)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            self._pool = pool
        return self._pool

    def warm(self) -> None:
        """Start the worker now (a server does, so its first vote is not the one that waits)."""
        with self._lock:
            self._warm_pool()

    def run(self, fn, *args):
        import concurrent.futures as cf

        with self._lock:
            try:
                pool = self._warm_pool()
            except (cf.TimeoutError, cf.process.BrokenProcessPool, OSError) as e:
                logger.warning("the answer checker did not start (%s): comparing text", e)
                _fell_back()
                return None
            try:
                return pool.submit(fn, *args).result(timeout=CHECK_TIMEOUT_S)
            except (cf.TimeoutError, cf.process.BrokenProcessPool) as e:
                logger.warning("answer check stopped after %.0f s (%s)", CHECK_TIMEOUT_S, e)
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.kill()
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                _fell_back()
                return None


_checker = _Checker()


def warm_checker() -> None:
    """Start the answer checker's worker ahead of the first check."""
    _checker.warm()


def answers_equivalent(a: str, b: str) -> bool:
    """True when two extracted answers are mathematically equal (math-verify), or equal as text.
    Bounded in time in every thread."""
    quick = _trivially(a, b)
    if quick is not None:
        return quick
    if _in_main_thread():
        return _equivalent_here(a, b)
    result = _checker.run(_equivalent_here, a, b)
    return bool(result)


def group_answers(answers: list[str]) -> list[int]:
    """Equivalence-class label per answer (label = index of the class's first member); bounded
    in time in every thread (off the main thread: one checked call for the whole vote, falling
    back to grouping equal texts)."""
    answers = list(answers)
    if _in_main_thread() or all(_trivially(a, b) is not None for a in answers for b in answers):
        return _group_here(answers)
    labels = _checker.run(_group_here, answers)
    if labels is None:
        first: dict[str, int] = {}
        return [first.setdefault(a.strip(), i) for i, a in enumerate(answers)]
    return labels
