"""The model's measured accuracy over both effort axes, candidates (k) and the thinking budget per
candidate (`metastone.thinking_scaling`), and the plan `--effort auto` makes from it under a
latency budget: the combination the table says is most accurate among those predicted to fit.

A point's latency is predicted from the decode steps it ran when it was measured (the 90th
percentile over the problems of its longest candidate: a batch runs until its last candidate ends),
not from `max_new_tokens`, the worst case the scheduler assumes without a table. The table is
written by `bench/thinking_scaling.py --record` (docs/model-file.md has the format).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_metastone.errors import InvalidRequestError
from edge_metastone.scheduler import (
    MODES,
    Budget,
    Calibration,
    Effort,
    Plan,
    Request,
    describe,
    limits,
    option,
)
from edge_metastone.types import KVLayout, KVType, ModelFacts, finite_number, whole_number

logger = logging.getLogger(__name__)

TABLE_VERSION = 1
MAX_POINTS = 256
MAX_K = 256
MAX_TOKENS = 1 << 20


@dataclass(frozen=True)
class ScalingPoint:
    """One measured combination: k candidates, each thinking at most `think_budget` tokens (None:
    unlimited), chosen by the table's selector."""

    k: int
    think_budget: int | None
    accuracy: float
    steps: int  # decode steps (90th percentile over the problems of the longest candidate)
    tokens: float  # mean generated tokens per candidate
    thought: float  # mean tokens inside the think window per candidate

    def __post_init__(self) -> None:
        _check(whole_number(self.k, 1) and self.k <= MAX_K, "k", f"an integer 1..{MAX_K}")
        b = self.think_budget
        ok = b is None or (whole_number(b, 0) and b <= MAX_TOKENS)
        _check(ok, "think_budget", "null or an integer >= 0")
        _check(_unit(self.accuracy), "accuracy", "a number in [0, 1]")
        ok = whole_number(self.steps, 1) and self.steps <= MAX_TOKENS
        _check(ok, "steps", "an integer >= 1")
        for name in ("tokens", "thought"):
            v = getattr(self, name)
            _check(finite_number(v) and 0 <= v <= MAX_TOKENS, name, "a number >= 0")

    @property
    def label(self) -> str:
        """`k=8, thinking <= 24 tokens` (or `unlimited thinking`)."""
        b = self.think_budget
        return f"k={self.k}, " + ("unlimited thinking" if b is None else f"thinking <= {b} tokens")


@dataclass(frozen=True)
class ScalingTable:
    """A model's recorded grid (`metastone.thinking_scaling`)."""

    points: tuple[ScalingPoint, ...]
    selector: str = ""  # the selector the accuracies are of (the model's default)
    max_new_tokens: int = 0  # what the points were measured with (0: not recorded)
    measured: dict[str, object] = field(default_factory=dict)  # problems, seed, ... (informative)

    def to_json(self) -> str:
        """The key's value (sorted keys)."""
        d = {
            "version": TABLE_VERSION,
            "selector": self.selector,
            "max_new_tokens": self.max_new_tokens,
            "measured": self.measured,
            "points": [p.__dict__ for p in self.points],
        }
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ScalingTable | None:
        """A model file's table; None when there is none, or (with a warning) when it is bad."""
        if not text:
            return None
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("version") != TABLE_VERSION:
                raise ValueError(f"not a version {TABLE_VERSION} table")
            rows = d.get("points")
            if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_POINTS:
                raise ValueError(f"points must be a list of 1..{MAX_POINTS} objects")
            names = ("k", "think_budget", "accuracy", "steps", "tokens", "thought")
            points = tuple(ScalingPoint(**{n: r[n] for n in names}) for r in rows)
            selector, max_new = d.get("selector", ""), d.get("max_new_tokens", 0)
            if not isinstance(selector, str) or not whole_number(max_new, 0):
                raise ValueError("selector must be text and max_new_tokens an integer")
            measured = d.get("measured") if isinstance(d.get("measured"), dict) else {}
            return cls(points, selector, int(max_new), measured)
        except (ValueError, TypeError, KeyError, InvalidRequestError) as e:
            logger.warning("ignoring the model's recorded thinking-scaling table: %s", e)
            return None


def plan_two_axis(
    table: ScalingTable,
    facts: ModelFacts,
    cal: Calibration,
    req: Request,
    budget: Budget,
    *,
    max_k: int | None,
    thinks: bool,
    layouts: Sequence[KVLayout],
    kv_types: Sequence[KVType],
) -> Plan | None:
    """Auto under a latency budget: the table's most accurate point predicted to fit both budgets
    (ties: the fewer predicted seconds); None when no point fits (the k-only choice then decides).
    Points with a thinking budget are left out for a model without think markup."""
    fitting = []
    for p in table.points:
        if (max_k is not None and p.k > max_k) or (p.think_budget is not None and not thinks):
            continue
        shaped = Request(req.prompt_tokens, min(req.max_new_tokens, p.steps), req.others)
        way = option(facts, cal, shaped, p.k, budget, layouts, kv_types).fit
        if way is not None:
            fitting.append((p, way))
    if not fitting:
        return None
    point, way = max(fitting, key=lambda pw: (pw[0].accuracy, -pw[1].latency_s))
    best = max(table.points, key=lambda p: p.accuracy)
    n = table.measured.get("problems", "?")
    why = (
        f"auto chose {point.label} from the model's thinking-scaling table: accuracy "
        f"{point.accuracy:.3f} there ({n} problems), the most accurate that fits; predicted "
        f"{describe(way)} over its measured {point.steps} steps{limits(budget)}"
    )
    if best is not point:
        why += f"; the table's best, {best.label} ({best.accuracy:.3f}), would not fit"
    effort = next((e for e, m in MODES.items() if m.k == point.k), Effort.AUTO)
    return Plan(effort, point.k, way, why, think_budget=point.think_budget)


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise InvalidRequestError(f"a point's {name} must be {what}", param=name)


def _unit(v: object) -> bool:
    return finite_number(v) and 0.0 <= v <= 1.0  # type: ignore[operator]
