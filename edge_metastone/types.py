"""The backend-neutral types: settings, requests, candidates, events, timings, model facts and
score results. Data only: each settings type checks its own values when it is made (the one place
they are validated); policy (which KV layout, how much memory) lives in `kvpolicy` and `scheduler`.

Nothing here imports a runtime (llama.cpp, onnxruntime), so search strategies, the scheduler, the
`Reasoner` and the fronts can use these types without loading one.
"""

from __future__ import annotations

import enum
import math
import numbers
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from edge_metastone.errors import InvalidRequestError


def _check(ok: bool, param: str, message: str) -> None:
    """Refuse a setting: an `InvalidRequestError` naming it."""
    if not ok:
        raise InvalidRequestError(message, param=param)


def finite_number(v: object) -> bool:
    """A real number that is a finite float: not NaN, not infinite, not an integer too large
    for a float (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def whole_number(v: object, low: int) -> bool:
    """An integer >= `low` (bools and integral floats are not)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn. temperature 0 means greedy; top_k 0, top_p 1, min_p 0 are off."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit), as OpenAI's API

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            _check(finite_number(getattr(self, name)), name, f"{name} must be a finite number")
        for name in ("top_k", "repeat_last_n", "seed"):
            _check(whole_number(getattr(self, name), 0), name, f"{name} must be an integer >= 0")
        _check(self.temperature >= 0, "temperature", "temperature must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]")
        _check(0 <= self.min_p < 1, "min_p", "min_p must be in [0, 1)")
        _check(self.repeat_penalty > 0, "repeat_penalty", "repeat_penalty must be > 0")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax."""
        return self.temperature == 0

    def candidate_seed(self, candidate: int) -> int:
        """The 32-bit seed of candidate `candidate`: a function of (seed, candidate) only."""
        return int(np.random.SeedSequence([self.seed, candidate]).generate_state(1)[0])


def _logit_bias(pairs: Iterable[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """`pairs` as (token id, bias) tuples. A NaN or infinite bias is refused: a large finite one
    (OpenAI's API allows -100) bans a token."""
    try:
        given = [tuple(p) for p in pairs]
    except TypeError:
        given = [()]
    _check(
        all(len(p) == 2 and whole_number(p[0], 0) and finite_number(p[1]) for p in given),
        "logit_bias",
        "logit_bias must be (token id >= 0, finite number) pairs",
    )
    return tuple((int(t), float(b)) for t, b in given)


@dataclass(frozen=True)
class PolicyKeys:
    """The model's policy keys as its file stores them: text, JSON for the structured ones (None:
    not recorded). `model_records.ModelRecords` parses and checks them once, when it opens."""

    default_strategy: str | None = None  # metastone.default_strategy
    adaptive: str | None = None  # metastone.adaptive
    selector: str | None = None  # metastone.selector (the head's file's)
    thinking_scaling: str | None = None  # metastone.thinking_scaling


WEIGHT_BUFFERS_ENV = "EDGE_METASTONE_WEIGHT_BUFFERS"  # the mode when a caller names none


class WeightBuffers(str, enum.Enum):
    """How a model's weights are laid out in CPU memory (`engine.weights` decides and
    applies it per load)."""

    AUTO = "auto"
    EXTRA = "extra"
    REPACK = "repack"
    PLAIN = "plain"


def requested_mode(value: WeightBuffers | str | None = None) -> WeightBuffers:
    """The caller's mode, else $EDGE_METASTONE_WEIGHT_BUFFERS, else auto (a bad value is one line)."""
    source = "weight buffers"
    if value is None:
        value = os.environ.get(WEIGHT_BUFFERS_ENV) or WeightBuffers.AUTO
        source = WEIGHT_BUFFERS_ENV
    try:
        return WeightBuffers(value)
    except ValueError:
        names = ", ".join(m.value for m in WeightBuffers)
        raise InvalidRequestError(f"{source}: {value!r} is not one of {names}") from None


class KVType(str, enum.Enum):
    """The KV cache's element type (llama.cpp's type_k / type_v)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"  # llama.cpp needs flash attention for a quantized V cache (set with it)


class KVLayout(str, enum.Enum):
    """How k candidates' KV cells are laid out.

    UNIFIED: one buffer; the shared prompt is stored once, but every candidate's step attends over
    every used cell (masked), so a step costs ~k x (prompt + k x length). STREAMS: one llama.cpp
    stream per candidate (kv_unified=False); each holds its own copy of the prompt and a step
    attends over its own cells only, ~k x (prompt + length). AUTO: the runtime's choice
    (`edge_metastone.kvpolicy.resolve_layout` on llama.cpp).
    """

    AUTO = "auto"
    UNIFIED = "unified"
    STREAMS = "streams"


@dataclass(frozen=True)
class GenerationSettings:
    """Limits and stops of one generation. `max_answer_tokens` caps tokens after `</think>`."""

    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ()
    max_answer_tokens: int | None = None
    score_steps: bool = True
    logprobs: bool = False
    keep_features: bool = False  # return each scored position's layer-(L-2) feature (training)
    kv_layout: KVLayout = KVLayout.AUTO  # see KVLayout; the one that ran is in the timings
    kv_type: KVType = KVType.F16  # q8_0 / q4_0 halve / quarter the KV cache's memory
    # the most candidates this generation may start: k in the first wave, then more waves while
    # the caller asks for them (`GenerationControl.extend` after a `WaveEvent`); None: k
    max_candidates: int | None = None
    # reuse the cells of an earlier prompt that starts the same way (a runtime with a shared
    # context keeps finished prompts while their sequences are free), and keep this one's. Off by
    # default: a prompt decoded in two parts can round differently (1e-7 in F32) from one pass
    cache_prompt: bool = False
    # tokens a candidate may write inside its think window; then the thought is ended for it
    # (`think_close`, the tokens written in its place: a short message, then `</think>`) and it
    # goes on to its answer under `max_answer_tokens`. None: no budget
    think_budget: int | None = None
    think_close: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        b = self.think_budget
        _check(
            b is None or whole_number(b, 0), "think_budget", "think_budget must be an integer >= 0"
        )
        object.__setattr__(self, "think_close", tuple(int(t) for t in self.think_close))
        _check(
            whole_number(n, 1),
            "max_new_tokens",
            "max_new_tokens must be an integer >= 1",
        )
        for name, kind in (("kv_type", KVType), ("kv_layout", KVLayout)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(v.value for v in kind)
                raise InvalidRequestError(
                    f"{name} must be one of {allowed} (got {value!r})", param=name
                ) from None
        a = self.max_answer_tokens
        _check(
            a is None or whole_number(a, 0),
            "max_answer_tokens",
            "max_answer_tokens must be an integer >= 0",
        )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
        m = self.max_candidates
        _check(
            m is None or whole_number(m, 1),
            "max_candidates",
            "max_candidates must be an integer >= 1",
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: k candidates over one prompt; candidate i samples with the seed
    (sampling.seed, candidate_offset + i)."""

    prompt: list[int]
    k: int
    sampling: SamplingSettings
    settings: GenerationSettings
    candidate_offset: int = 0


@dataclass(frozen=True)
class ModelFacts:
    """What the scheduler's memory and latency models need to know of a model."""

    weight_bytes: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_embd: int
    n_ff: int
    n_heads: int
    n_vocab: int
    n_ctx_train: int
    head_bytes: int = 0


class FinishReason(str, enum.Enum):
    """Why a candidate ended."""

    EOS = "eos"  # the model ended its turn
    LENGTH = "length"  # max_new_tokens (or the answer budget) reached
    STOP = "stop"  # a stop string appeared
    PRUNED = "pruned"  # dropped mid-generation: a search strategy's rule or low confidence
    HALTED = "halted"  # the caller stopped the whole generation (e.g. out of time)

    @property
    def cut(self) -> bool:
        """The candidate was cut before it ended its turn (any reason but EOS and STOP)."""
        return self is not FinishReason.EOS and self is not FinishReason.STOP


@dataclass(frozen=True)
class Candidate:
    """One finished candidate."""

    index: int
    token_ids: list[int]
    text: str
    step_positions: list[int]  # token indices (prompt + generation) of the scored features
    step_scores: list[float]
    score: float | None  # trajectory score; None when the model has no head or scoring is off
    finish_reason: FinishReason
    # the policy's mean token log-probability over the tokens it scored, the end-of-turn token
    # included (settings.logprobs); None when it scored none
    mean_logprob: float | None = None
    step_features: np.ndarray | None = None  # [n_steps, C] float32 (settings.keep_features)
    # each scored token's log-probability, the end-of-turn token last (settings.logprobs)
    token_logprobs: list[float] | None = field(default=None, repr=False)
    stop_note: str = ""  # why it was stopped before its end (pruned or halted), for people
    # per scored step: the model's own confidence, the geometric mean probability of the step's
    # tokens (settings.logprobs; None for a step in the prompt); [] without logprobs
    step_confidence: list[float | None] = field(default_factory=list)
    thought_ended: bool = False  # its thinking budget ran out: the loop wrote `</think>` for it

    @property
    def n_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids)

    @property
    def truncated(self) -> bool:
        """True when the candidate was cut before it ended its turn."""
        return self.finish_reason.cut


@dataclass(frozen=True)
class TokenEvent:
    """Candidate `candidate` produced `token_id`; `text` is the newly decodable text."""

    candidate: int
    token_id: int
    text: str


@dataclass(frozen=True)
class StepEvent:
    """A step boundary was scored online (inside the current think window)."""

    candidate: int
    position: int
    score: float
    n_steps: int
    running_score: float
    confidence: float | None = None  # the step's own confidence (StepConfidence; logprobs)


@dataclass(frozen=True)
class FinishEvent:
    """A candidate ended; `text_tail` is its text not streamed yet (held back as a possible stop
    string's start, or an incomplete UTF-8 ending)."""

    candidate: int
    result: Candidate
    text_tail: str = ""


@dataclass(frozen=True)
class WaveEvent:
    """Adaptive compute: wave `wave` (1-based) of `size` candidates starts (`phase` "start"), its
    candidates have all ended (`phase` "end"; the caller may then `GenerationControl.extend`), or
    the caller settled the choice (`phase` "stop", with its `reason`). `candidates` counts every
    candidate started so far."""

    wave: int
    phase: str
    size: int
    candidates: int
    reason: str = ""


Event = TokenEvent | StepEvent | FinishEvent | WaveEvent


@dataclass
class Timings:
    """Seconds spent per phase of one generation, and the token counts."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    sample_s: float = 0.0
    score_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0  # tokens run through the model to fill prompt caches (once a prompt)
    cached_prompt_tokens: int = 0  # the prompt's first tokens found in the prompt cache
    waves: int = 0  # waves of candidates started (1 for a fixed k)
    kv_layout: str = ""  # the KV layout that ran: unified or streams (KVLayout)
    kv_type: str = ""  # the KV cache's element type: f16, q8_0, q4_0 (f32 in parity mode)
    weight_buffers: str = ""  # llama.cpp: where the weights live (extra, repack, plain)
    weight_buffers_reason: str = ""  # ... and why (the request, and what the build offers)
    queue_s: float = 0.0  # waiting for room (sequences) in the model's shared context
    shared_rounds: int = 0  # decodes shared with (or waited for) other requests' generations

    def as_dict(self) -> dict[str, float | str]:
        """JSON-ready, with derived rates."""
        d = dict(self.__dict__)
        d["decode_tokens_per_s"] = self.generated_tokens / self.decode_s if self.decode_s else 0.0
        return d


class GenerationControl:
    """The caller's handle on one generation: prune candidates or halt everything between steps,
    and read the generation's own timings (filled in by the backend as it runs; a generation run
    through several calls with one control adds them up)."""

    def __init__(self) -> None:
        self.pruned: set[int] = set()
        self.prune_notes: dict[int, str] = {}
        self.halted = False
        self.halt_note = ""
        self.timings = Timings()
        self.requested = 0  # more candidates asked for after a wave (taken by the next wave)
        # online termination: a candidate whose mean token log-probability over its last
        # `window` tokens falls below `min_confidence` is pruned (None: off)
        self.min_confidence: float | None = None
        self.window = 16
        # polled while the generation waits for room in a shared model (True: give up waiting)
        self.aborted: Callable[[], bool] | None = None

    def prune(self, candidate: int, note: str = "") -> None:
        """End candidate `candidate` at the next step (`note`: why, for people)."""
        self.pruned.add(candidate)
        if note:
            self.prune_notes[candidate] = note

    def extend(self, n: int) -> None:
        """After a wave ended: start n more candidates (within `max_candidates`)."""
        self.requested += n

    def halt(self, note: str = "") -> None:
        """End every live candidate at the next step (`note`: why, for people)."""
        self.halted = True
        self.halt_note = self.halt_note or note


@dataclass(frozen=True)
class ScoreResult:
    """Scored feature positions (token indices), their step scores, and the trajectory score."""

    positions: list[int]
    step_scores: list[float]
    score: float
    n_tokens: int = 0
    token_ids: list[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, object]:
        """The `score --json` object of SPEC §3."""
        return {"positions": self.positions, "step_scores": self.step_scores, "score": self.score}
