"""The embedded MetaStone-nano's task, as a check of prompts: integer arithmetic with + - *, 2 to 5
operations on operands of one or two digits, every intermediate within +-999, phrased as the
training data phrases it (`What is (17+25)*3-40?`, `Compute ...`, `Evaluate ...`, `Calculate ...`,
`... = ?`). The grammar is `examples/nano/task.py`'s; a prompt outside it still gets an answer,
with a warning (the model answers every prompt with a number, right or not)."""

from __future__ import annotations

import re
from dataclasses import dataclass

TASK = "integer arithmetic, 2-5 operations, one step per operation"  # the provenance's "task"
DOMAIN = (
    "integer arithmetic: + - * and parentheses, 2-5 operations, operands of one or two digits, "
    "every intermediate result within -999..999"
)
MAX_ABS = 999
MIN_OPS, MAX_OPS = 2, 5
# the longest reference answer of 5 operations is 67 tokens (3,000 drawn); 160 leaves room for a slow, wrong
# trace and stops a degenerate one (that repeats a step) early
MAX_NEW_TOKENS = 160

_FORMS = (
    re.compile(r"^(?:what\s+is|compute|evaluate|calculate)\s+(?P<e>.+?)\s*[?.]?$", re.I),
    re.compile(r"^(?P<e>.+?)\s*=\s*\?$"),
)
_TOKEN = re.compile(r"\s*(\d+|[-+*()])")


@dataclass(frozen=True)
class Task:
    """A model's task as its provenance names it: what it can do and how to check a prompt."""

    name: str
    domain: str
    max_new_tokens: int

    def outside(self, prompt: str) -> str | None:
        """Why `prompt` is outside the task (one line), or None when it is inside."""
        return outside_arithmetic(prompt)


ARITHMETIC = Task(TASK, DOMAIN, MAX_NEW_TOKENS)
TASKS = {TASK: ARITHMETIC}


class _Outside(Exception):
    pass


class _Expr:
    """A recursive-descent evaluator of + - * with parentheses that checks the task's bounds."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.i = 0
        self.ops = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise _Outside("the expression ends early")
        self.i += 1
        return tok

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = self.apply(op, value, self.term())
        return value

    def term(self) -> int:
        value = self.atom()
        while self.peek() == "*":
            self.take()
            value = self.apply("*", value, self.atom())
        return value

    def atom(self) -> int:
        tok = self.take()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise _Outside("unbalanced parentheses")
            return value
        if not tok.isdigit():
            raise _Outside(f"'{tok}' where a number belongs")
        if len(tok) > 2:
            raise _Outside(f"the operand {tok} has more than two digits")
        return int(tok)

    def apply(self, op: str, a: int, b: int) -> int:
        self.ops += 1
        value = a + b if op == "+" else a - b if op == "-" else a * b
        if abs(value) > MAX_ABS:
            raise _Outside(f"the intermediate result {value} is outside -999..999")
        return value


def outside_arithmetic(prompt: str) -> str | None:
    """Why `prompt` is not one of MetaStone-nano's arithmetic problems, or None when it is."""
    text = " ".join(prompt.split())
    if not text:
        return "the prompt is empty"
    match = next((m for f in _FORMS if (m := f.match(text))), None)
    if match is None:
        return "it is not an arithmetic question ('What is <expression>?')"
    expr = match.group("e")
    tokens = _TOKEN.findall(expr)
    if "".join(tokens) != expr.replace(" ", ""):
        shown = expr if len(expr) <= 40 else expr[:37] + "..."
        return f"'{shown}' is not an expression of numbers, + - * and parentheses"
    parser = _Expr(tokens)
    try:
        parser.expr()
        if parser.peek() is not None:
            raise _Outside(f"unexpected '{parser.peek()}'")
    except _Outside as e:
        return str(e)
    if not MIN_OPS <= parser.ops <= MAX_OPS:
        return f"it has {parser.ops} operations; the model was trained on {MIN_OPS}-{MAX_OPS}"
    return None
