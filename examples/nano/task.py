"""MetaStone-nano's task: integer arithmetic, one operation per reasoning step.

`What is (17+25)*3-40?` -> `<think>\\n17+25=42.\\n\\n42*3=126.\\n\\n126-40=86.\\n\\n</think>\\n\\n
The answer is \\boxed{86}.` 2 to 5 binary operations among + - *, operands of one or two digits,
evaluated in the order the parentheses (and precedence) give; every intermediate stays within
+-999. Everything is a pure function of a `random.Random`, so a seed fixes a data set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_ABS = 999
STEP = ".\n\n"
PROMPT_FORMS = (
    "What is {e}?",
    "What is {e}?",
    "What is {e}?",
    "Compute {e}.",
    "Evaluate {e}.",
    "Calculate {e}.",
    "{e} = ?",
)
_PREC = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class Node:
    """An expression tree: a leaf holds `value`; an inner node `op` over `left`, `right`."""

    value: int
    op: str | None = None
    left: Node | None = None
    right: Node | None = None


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _build(rng: random.Random, n_ops: int) -> Node:
    if n_ops == 0:
        return Node(rng.randint(1, 99) if rng.random() < 0.7 else rng.randint(1, 9))
    n_left = rng.randint(0, n_ops - 1)
    left, right = _build(rng, n_left), _build(rng, n_ops - 1 - n_left)
    op = rng.choice("+-*")
    return Node(_apply(op, left.value, right.value), op, left, right)


def _fits(node: Node) -> bool:
    if node.op is None:
        return True
    return abs(node.value) <= MAX_ABS and _fits(node.left) and _fits(node.right)


def random_expression(rng: random.Random, min_ops: int = 2, max_ops: int = 5) -> Node:
    """A random tree of min_ops..max_ops operations whose intermediates all fit in +-999."""
    n_ops = rng.randint(min_ops, max_ops)
    while True:
        tree = _build(rng, n_ops)
        if _fits(tree):
            return tree


def render(node: Node, parent_prec: int = 0, right_side: bool = False) -> str:
    """Infix text with only the parentheses that precedence and left-associativity need."""
    if node.op is None:
        return str(node.value)
    p = _PREC[node.op]
    text = render(node.left, p) + node.op + render(node.right, p, right_side=True)
    needs = p < parent_prec or (right_side and p == parent_prec and node.op != "*")
    # a*(b*c) also keeps its parentheses: the steps follow the tree exactly
    needs = needs or (right_side and p == parent_prec)
    return f"({text})" if needs else text


def _num(v: int, right: bool) -> str:
    return f"({v})" if v < 0 and right else str(v)


def steps(node: Node) -> list[tuple[int, str, int, int]]:
    """The operations in evaluation order (left subtree first): (a, op, b, result)."""
    if node.op is None:
        return []
    return [
        *steps(node.left),
        *steps(node.right),
        (node.left.value, node.op, node.right.value, node.value),
    ]


def step_text(a: int, op: str, b: int, result: int) -> str:
    """One reasoning step without its delimiter: `17+25=42`."""
    return f"{_num(a, False)}{op}{_num(b, True)}={result}"


@dataclass(frozen=True)
class Problem:
    """One prompt, its gold answer and its reference reasoning."""

    prompt: str
    answer: int
    tree: Node

    @property
    def ops(self) -> list[tuple[int, str, int, int]]:
        """The operations in evaluation order: (a, op, b, result)."""
        return steps(self.tree)

    def thinking(self) -> str:
        """The reference chain of thought (what follows `<think>\\n`)."""
        return "".join(step_text(*s) + STEP for s in self.ops)

    def response(self) -> str:
        """The reference assistant turn after the template's `<think>\\n`."""
        return f"{self.thinking()}</think>\n\nThe answer is \\boxed{{{self.answer}}}."


def make_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 5) -> Problem:
    """A random problem; the prompt phrasing varies."""
    tree = random_expression(rng, min_ops, max_ops)
    form = rng.choice(PROMPT_FORMS)
    return Problem(form.format(e=render(tree)), tree.value, tree)


def problems(seed: int, n: int, min_ops: int = 2, max_ops: int = 5) -> list[Problem]:
    """`n` problems drawn from `seed`, deduplicated by prompt text."""
    rng = random.Random(seed)
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        p = make_problem(rng, min_ops, max_ops)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def slip(rng: random.Random, value: int) -> int:
    """A plausible wrong result: one digit off, a carry lost, digits swapped or the sign lost."""
    s = str(abs(value))
    sign = -1 if value < 0 else 1
    for _ in range(20):
        kind = rng.random()
        if kind < 0.45:  # one digit off by one or two
            i = rng.randrange(len(s))
            d = (int(s[i]) + rng.choice((-2, -1, 1, 2))) % 10
            if i == 0 and d == 0 and len(s) > 1:
                continue
            cand = sign * int(s[:i] + str(d) + s[i + 1 :])
        elif kind < 0.7:  # a carry or borrow lost
            cand = value + rng.choice((-10, 10, -100, 100, -1, 1))
        elif kind < 0.85 and len(s) > 1:  # two neighbouring digits swapped
            i = rng.randrange(len(s) - 1)
            t = s[:i] + s[i + 1] + s[i] + s[i + 2 :]
            if t[0] == "0":
                continue
            cand = sign * int(t)
        else:  # the sign lost, or a small slip
            cand = -value if value != 0 and rng.random() < 0.5 else value + rng.choice((-3, 3))
        if cand != value and abs(cand) <= MAX_ABS:
            return cand
    return value + 1


def slipped_steps(tree: Node, at: int, wrong: int) -> list[tuple[int, str, int, int]]:
    """The steps of `tree` with step `at`'s result replaced by `wrong`, carried through the rest."""
    out: list[tuple[int, str, int, int]] = []

    def walk(node: Node) -> int:
        if node.op is None:
            return node.value
        a, b = walk(node.left), walk(node.right)
        r = wrong if len(out) == at else _apply(node.op, a, b)
        out.append((a, node.op, b, r))
        return r

    walk(tree)
    return out
