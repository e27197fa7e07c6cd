"""The budget scheduler: predict each effort mode's latency and peak memory on this machine, and
choose the highest effort that fits the caller's budgets.

Latency comes from a calibration of the machine with this model (decode step time at batch sizes
1..32, what attention over the KV cache adds, prefill tokens/s), measured once (~20 s for a 200M
model on 2 cores) and cached on disk (`calibration`). Memory comes from the model's facts: the process after
loading (measured once), plus the KV cache, the logits buffer and llama.cpp's compute buffer of
the context the request needs. Both depend on the KV layout and element type the request runs with (`KVLayout`, `KVType`):

- unified: the cache holds pad256(prompt + k x new) cells, and at step s each of the k candidates
  attends over its own prompt + s cells and is masked out of the other (k-1) x s cells (flash
  attention skips a masked cell, but the mask still has to be built and read);
- streams: k streams of pad256(prompt + new) cells each, every candidate attending over its own.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from edge_metastone.errors import BudgetError, InvalidRequestError
from edge_metastone.kvpolicy import (
    flash_attention,
    kv_cells,
    pad_cells,
    resolve_layout,
    score_matrix_bytes,
)
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.types import KVLayout, KVType, ModelFacts

logger = logging.getLogger(__name__)

CALIBRATION_VERSION = 5  # 5: checked measurements, the `suspect` mark
MIB = 2**20
# bytes per KV element (ggml's block sizes: q8_0 is 34 bytes per 32, q4_0 18 per 32)
KV_ELEMENT_BYTES = {KVType.F16: 2.0, KVType.Q8_0: 34 / 32, KVType.Q4_0: 18 / 32}


class Effort(str, enum.Enum):
    """The paper's effort modes (k candidates), and `auto` (the scheduler chooses); how each is
    planned is its row in `MODES`."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    AUTO = "auto"
    ADAPTIVE = "adaptive"  # waves of candidates until the answer is settled (search.adaptive)

    @property
    def mode(self) -> Mode:
        """How the scheduler plans this effort."""
        return MODES[self]

    @property
    def k(self) -> int:
        """Candidates generated in this mode."""
        k = MODES[self].k
        if k is None:
            raise ValueError(f"{self.value} has no fixed k")
        return k


@dataclass(frozen=True)
class Mode:
    """One effort mode's row: what `choose` does with it.

    - `k`: the candidates it generates (None: the scheduler picks them);
    - `ladder`: auto may pick it (the highest k that fits the budgets);
    - `chooses`: the scheduler picks the effort from the ladder, so it needs a calibration.

    A mode with a k runs as asked: over a latency budget it runs until the deadline and returns
    the best candidate so far; only a memory budget it cannot fit refuses it.
    """

    k: int | None
    ladder: bool = True
    chooses: bool = False


MODES: dict[Effort, Mode] = {
    Effort.LOW: Mode(2),
    Effort.MEDIUM: Mode(8),
    Effort.HIGH: Mode(32),
    Effort.AUTO: Mode(None, ladder=False, chooses=True),
    Effort.ADAPTIVE: Mode(None, ladder=False),  # planned by edge_metastone.adaptive_budget
}
FIXED_EFFORTS = tuple(e for e, m in MODES.items() if m.ladder)  # auto's ladder, lowest first


def kv_bytes(facts: ModelFacts, n_ctx: int, kv_type: KVType = KVType.F16) -> int:
    """K and V of `kv_type` for `n_ctx` cells (padded as llama.cpp does)."""
    row = facts.n_kv_heads * facts.head_dim * KV_ELEMENT_BYTES[KVType(kv_type)]
    return int(2 * facts.n_layers * row * pad_cells(n_ctx))


def context_bytes(
    facts: ModelFacts,
    n_ctx: int,
    n_batch: int,
    kv_type: KVType = KVType.F16,
    n_streams: int = 1,
) -> int:
    """KV cache + logits buffer + an estimate of llama.cpp's CPU compute buffer, with the score
    matrix of plain attention where the engine runs it (`kvpolicy.flash_attention`)."""
    kv = kv_bytes(facts, n_ctx, kv_type)
    logits = 4 * facts.n_vocab * n_batch
    # the largest graph is a prefill ubatch: activations, FFN, logits
    compute = 4 * n_batch * (facts.n_vocab + 3 * facts.n_ff + 6 * facts.n_embd)
    if not flash_attention(kv_type, facts.n_heads, n_ctx, n_batch, n_streams):
        compute += score_matrix_bytes(facts.n_heads, n_ctx, n_batch, n_streams)
    return kv + logits + compute


@dataclass(frozen=True)
class Calibration:
    """How fast this machine runs this model, and what the loaded process weighs."""

    step_seconds: dict[int, float]  # batch size -> seconds per decode step
    prefill_tokens_per_s: float
    base_rss_bytes: int  # the process after loading the model and a first tiny generation
    n_threads: int
    # batch size -> extra seconds per decode step for each (live sequence x KV cell it attends to)
    attn_s_per_seq_cell: dict[int, float] = field(default_factory=dict)
    # extra seconds per decode step for each (sequence x cell it is masked out of): the unified
    # layout's cost of the other candidates' cells
    masked_s_per_seq_cell: float = 0.0
    # attended-cell cost of a q8_0 cache relative to F16 (q4_0 is taken to cost the same)
    quantized_attn_factor: float = 1.0
    key: str = ""
    measured_at: float = field(default_factory=time.time)
    # why a run disagreed with this calibration's prediction: re-checked before it is used again
    suspect: str = ""

    def step_time(self, batch: int) -> float:
        """Seconds per decode step at `batch` live sequences (log-linear between measured sizes)."""
        return _interpolate(self.step_seconds, batch, extrapolate_linear=True)

    def attn_time(self, batch: int) -> float:
        """Seconds per step per (sequence x KV cell) at `batch` live sequences."""
        if not self.attn_s_per_seq_cell:
            return 0.0
        return _interpolate(self.attn_s_per_seq_cell, batch, extrapolate_linear=False)

    def to_json(self) -> dict[str, object]:
        """Serializable form (JSON keys are strings)."""
        d = asdict(self)
        d["step_seconds"] = {str(b): s for b, s in self.step_seconds.items()}
        d["attn_s_per_seq_cell"] = {str(b): s for b, s in self.attn_s_per_seq_cell.items()}
        d["version"] = CALIBRATION_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Calibration:
        """Inverse of to_json."""
        if d.get("version") != CALIBRATION_VERSION:
            raise ValueError("calibration format changed")
        return cls(
            step_seconds={int(b): float(s) for b, s in dict(d["step_seconds"]).items()},
            prefill_tokens_per_s=float(d["prefill_tokens_per_s"]),
            base_rss_bytes=int(d["base_rss_bytes"]),
            n_threads=int(d["n_threads"]),
            attn_s_per_seq_cell={
                int(b): float(s) for b, s in dict(d.get("attn_s_per_seq_cell") or {}).items()
            },
            masked_s_per_seq_cell=float(d.get("masked_s_per_seq_cell", 0.0)),
            quantized_attn_factor=float(d.get("quantized_attn_factor", 1.0)),
            key=str(d.get("key", "")),
            measured_at=float(d.get("measured_at", 0.0)),
            suspect=str(d.get("suspect", "")),
        )


def _interpolate(table: dict[int, float], x: int, *, extrapolate_linear: bool) -> float:
    """Log-linear interpolation in x over a {size: value} table; flat (or linear) beyond it."""
    sizes = sorted(table)
    if x <= sizes[0]:
        return table[sizes[0]]
    for lo, hi in itertools.pairwise(sizes):
        if x <= hi:
            w = (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return table[lo] * (1 - w) + table[hi] * w
    top = sizes[-1]
    return table[top] * (x / top if extrapolate_linear else 1.0)


@dataclass(frozen=True)
class Request:
    """The shape of one reasoning request."""

    prompt_tokens: int
    max_new_tokens: int
    others: int = 0  # other requests' sequences decoding beside it in a shared context


@dataclass(frozen=True)
class Budget:
    """The caller's limits; None means unlimited. `allow_degrade`: fall back to k=1 if nothing fits."""

    latency_s: float | None = None
    memory_bytes: int | None = None
    allow_degrade: bool = False

    def __post_init__(self) -> None:
        if self.latency_s is not None and self.latency_s <= 0:
            raise InvalidRequestError("the latency budget must be positive")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise InvalidRequestError("the memory budget must be positive")


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of running k candidates for a request with this KV layout and type."""

    k: int
    latency_s: float
    memory_bytes: int
    layout: KVLayout = KVLayout.UNIFIED
    kv_type: KVType = KVType.F16


@dataclass(frozen=True)
class Plan:
    """The scheduler's decision."""

    effort: Effort | None  # None: degraded to a single candidate
    k: int
    prediction: Prediction | None  # None: a fixed effort with no budget, nothing predicted
    reason: str
    predictions: tuple[Prediction, ...] = ()
    think_budget: int | None = None  # chosen with k from the model's table (thinking_scaling)

    @property
    def degraded(self) -> bool:
        """True when no effort mode fitted and a single candidate runs instead."""
        return self.effort is None


def predict(
    facts: ModelFacts,
    cal: Calibration,
    req: Request,
    k: int,
    layout: KVLayout = KVLayout.AUTO,
    kv_type: KVType = KVType.F16,
) -> Prediction:
    """Worst-case latency (every candidate runs to max_new_tokens) and peak memory of k candidates
    in `layout` (AUTO: the one the engine picks) with a `kv_type` cache."""
    t, p = req.max_new_tokens, req.prompt_tokens
    layout, kv_type = resolve_layout(KVLayout(layout), k, p, t), KVType(kv_type)
    n_batch = max(min(p, PREFILL_BATCH), k)
    # summed over steps s=1..t: k sequences x (p + s) cells each attends to, and (unified) the
    # (k-1) x s cells of the other candidates each is masked out of
    attended = k * (t * p + t * (t + 1) / 2)
    masked = k * (k - 1) * t * (t + 1) / 2 if layout is KVLayout.UNIFIED else 0.0
    factor = 1.0 if kv_type is KVType.F16 else cal.quantized_attn_factor
    # beside other requests' sequences, each step decodes their rows too (worst case: all along)
    rows = k + req.others
    latency = (
        p / cal.prefill_tokens_per_s
        + t * cal.step_time(rows)
        + cal.attn_time(rows) * factor * attended * rows / k
        + cal.masked_s_per_seq_cell * masked
    )
    cells = kv_cells(p, t, k, layout)
    streams = k if layout is KVLayout.STREAMS else 1
    memory = cal.base_rss_bytes + context_bytes(facts, cells, n_batch, kv_type, streams)
    return Prediction(k, latency, int(memory), layout, kv_type)


def fits(p: Prediction, budget: Budget) -> bool:
    """The prediction is within both budgets (an unset one is no limit)."""
    return (budget.latency_s is None or p.latency_s <= budget.latency_s) and (
        budget.memory_bytes is None or p.memory_bytes <= budget.memory_bytes
    )


def describe(p: Prediction) -> str:
    """`k=8 (unified): ~1.2 s, ~300 MiB`."""
    kv = f", {p.kv_type.value} KV" if p.kv_type is not KVType.F16 else ""
    return f"k={p.k} ({p.layout.value}{kv}): ~{p.latency_s:.1f} s, ~{p.memory_bytes / MIB:.0f} MiB"


@dataclass(frozen=True)
class Option:
    """One k's best way to run within the budget (`fit`), or None; `default` is how it runs
    without a memory budget (see `option`)."""

    default: Prediction
    fit: Prediction | None

    def why(self) -> str:
        """Why the fitting way is not the default one (empty when it is)."""
        if self.fit is None or self.fit == self.default:
            return ""
        return f"; the default {describe(self.default)} would not fit"


def option(
    facts: ModelFacts,
    cal: Calibration,
    req: Request,
    k: int,
    budget: Budget,
    layouts: Sequence[KVLayout],
    kv_types: Sequence[KVType],
) -> Option:
    """k candidates as the engine would run them (AUTO layout, the first of `kv_types`: F16 unless
    the request named one), else, when that misses the memory budget, the other layout, then a
    q8_0 cache (step scores move by <= 0.008 on the bench model, bench/kv_quant.py), whichever
    first fits both budgets."""
    first = KVType(kv_types[0]) if kv_types else KVType.F16
    default = predict(facts, cal, req, k, kv_type=first)
    if k >= 2 and layouts and default.layout not in layouts:  # e.g. ONNX: one cache per row
        default = predict(facts, cal, req, k, layouts[0], first)
    ways = [default]
    if k >= 2 and budget.memory_bytes is not None and not fits(default, budget):
        others = [lay for lay in (KVLayout.STREAMS, KVLayout.UNIFIED) if lay is not default.layout]
        order = [(default.layout, first)] + [(lay, first) for lay in others if lay in layouts]
        if first is KVType.F16 and KVType.Q8_0 in kv_types:
            order += [(lay, KVType.Q8_0) for lay, _ in order]
        ways = [predict(facts, cal, req, k, lay, kv) for lay, kv in order]
    fit = next((w for w in ways if fits(w, budget)), None)
    return Option(default, fit)


def choose(
    effort: Effort,
    facts: ModelFacts,
    cal: Calibration,
    req: Request,
    budget: Budget,
    *,
    efforts: Sequence[Effort] = FIXED_EFFORTS,
    layouts: Sequence[KVLayout] = (KVLayout.UNIFIED, KVLayout.STREAMS),
    kv_types: Sequence[KVType] = (KVType.F16, KVType.Q8_0),
) -> Plan:
    """The effort to run: the requested one (over a latency budget it runs until the deadline), or
    (auto) the highest of `efforts` that fits both budgets. Each plan names its KV layout and type
    (see `option`); `layouts` and `kv_types` are what the backend can run (the first type is the
    default)."""
    if req.prompt_tokens + req.max_new_tokens > facts.n_ctx_train:
        raise BudgetError(
            f"prompt ({req.prompt_tokens}) + max_new_tokens ({req.max_new_tokens}) exceeds the "
            f"model's context of {facts.n_ctx_train} tokens"
        )
    opts = [option(facts, cal, req, e.k, budget, layouts, kv_types) for e in efforts]
    preds = tuple(o.fit or o.default for o in opts)
    if not effort.mode.chooses:
        o = dict(zip(efforts, opts, strict=True)).get(effort) or option(
            facts, cal, req, effort.k, budget, layouts, kv_types
        )
        if o.fit is None:  # the ways that fit the memory budget alone
            memory_only = Budget(memory_bytes=budget.memory_bytes)
            o = Option(
                o.default, option(facts, cal, req, effort.k, memory_only, layouts, kv_types).fit
            )
            return _anytime(effort, o, budget, preds)
        return _fixed(effort, o, budget, preds)
    fitting = [(e, o) for e, o in zip(efforts, opts, strict=True) if o.fit is not None]
    if fitting:
        return _highest(fitting, opts, budget, preds)
    return _single(facts, cal, req, budget, opts[0].default, preds)


def _fixed(effort: Effort, o: Option, budget: Budget, preds: tuple[Prediction, ...]) -> Plan:
    """The requested effort, when it fits."""
    assert o.fit is not None
    why = f"{effort.value} requested; predicted {describe(o.fit)}{limits(budget)}{o.why()}"
    return Plan(effort, o.fit.k, o.fit, why, preds)


def _anytime(effort: Effort, o: Option, budget: Budget, preds: tuple[Prediction, ...]) -> Plan:
    """The requested effort over its latency budget: it runs, stops at the deadline and returns
    the best candidate so far. Only a memory budget that no way of running it fits refuses it."""
    if o.fit is None:
        raise BudgetError(
            f"effort {effort.value} does not fit the memory budget: predicted "
            f"{describe(o.default)}{limits(budget)}"
        )
    why = (
        f"{effort.value} requested; predicted {describe(o.fit)}{limits(budget)}{o.why()}: "
        "over the latency budget, it runs until the deadline and returns the best candidate so far"
    )
    return Plan(effort, o.fit.k, o.fit, why, preds)


def _highest(
    fitting: list[tuple[Effort, Option]],
    opts: list[Option],
    budget: Budget,
    preds: tuple[Prediction, ...],
) -> Plan:
    """Auto: the highest effort that fits."""
    e, o = max(fitting, key=lambda eo: eo[0].k)
    p = o.fit
    assert p is not None
    higher = [q for q in opts if q.default.k > p.k]
    why = f"; {describe(higher[0].default)} would not fit" if higher else ""
    reason = f"auto chose {e.value}: predicted {describe(p)}{limits(budget)}{o.why()}{why}"
    return Plan(e, p.k, p, reason, preds)


def _single(
    facts: ModelFacts,
    cal: Calibration,
    req: Request,
    budget: Budget,
    lowest: Prediction,
    preds: tuple[Prediction, ...],
) -> Plan:
    """Auto, nothing fits: one candidate when the caller allows it (over the latency budget it runs
    until the deadline), else a clear error naming `--allow-degrade`. One candidate over the memory
    budget is refused either way."""
    single = predict(facts, cal, req, 1)
    lim = limits(budget)
    if budget.memory_bytes is not None and single.memory_bytes > budget.memory_bytes:
        raise BudgetError(
            f"nothing fits the memory budget, not even one candidate: {describe(single)}{lim}"
        )
    in_time = fits(single, budget)
    if not budget.allow_degrade:
        runs = "runs one candidate" + ("" if in_time else " until the deadline")
        raise BudgetError(
            f"no effort mode fits the budget: the lowest needs {describe(lowest)}{lim}; "
            f"--allow-degrade (allow_degrade) {runs}, predicted {describe(single)}"
        )
    logger.warning("no effort mode fits the budget; running a single candidate")
    late = "" if in_time else f" ({describe(single)}): it runs until the deadline"
    reason = f"no effort mode fits ({describe(lowest)}{lim}); degraded to k=1{late}"
    return Plan(None, 1, single, reason, preds)


def limits(budget: Budget) -> str:
    """` (budget 2 s, 512 MiB)`, or empty."""
    parts = []
    if budget.latency_s is not None:
        parts.append(f"{budget.latency_s:g} s")
    if budget.memory_bytes is not None:
        parts.append(f"{budget.memory_bytes / MIB:.0f} MiB")
    return f" (budget {', '.join(parts)})" if parts else ""
