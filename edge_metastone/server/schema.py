"""The `/v1/chat/completions` request (validated) and the response objects built from a
`ReasonResult`: OpenAI's shapes, plus the `metastone` extension field standard clients ignore."""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_metastone.errors import InvalidRequestError
from edge_metastone.options import CandidateView, Prompt, ReasonOptions, ReasonResult
from edge_metastone.scheduler import Effort
from edge_metastone.search.adaptive import stopped_early
from edge_metastone.server.errors import ApiError, bad_request
from edge_metastone.server.progress import message
from edge_metastone.types import Event, FinishEvent, StepEvent, TokenEvent, WaveEvent

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1

# the request's names for the `ReasonOptions` fields they set (where they differ)
_PARAMS = {"max_new_tokens": "max_tokens", "think_budget": "thinking_budget_tokens"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    """One part of a message's content; only text is understood."""

    type: Literal["text"]
    text: str


class Message(_Strict):
    """A chat message (tool calls and images are not supported)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    """`stream_options`: only `include_usage` is read."""

    include_usage: bool = False


class _Request(_Strict):
    """The fields both completion routes read; unknown fields are ignored."""

    model: str | None = None
    # the values are checked once, by `ReasonOptions`; here only the API's own limits
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, le=2)  # OpenAI's range
    top_p: float | None = None
    top_k: int | None = None  # llama-server's and vLLM's extensions (0: off)
    min_p: float | None = None
    seed: int | None = Field(default=None, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extension fields
    effort: str | None = None
    strategy: str | None = None
    latency_budget: float | None = None
    memory_budget: float | None = None
    allow_degrade: bool = False
    kv_cache: str | None = None  # the KV cache's type (default: f16, q8_0 under budget)
    cache_prompt: bool = True  # llama-server's field: reuse the cells of an earlier prompt
    thinking_budget_tokens: int | None = None  # llama-server's field: each candidate's budget


class ChatRequest(_Request):
    """A `/v1/chat/completions` request."""

    messages: list[Message] = Field(min_length=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class TextRequest(_Request):
    """A `/v1/completions` request: one raw prompt (a string, or a list of one string), fed as
    it is with the model's own BOS (the CLI's `--raw`)."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int  # the largest max_tokens accepted
    default_max_tokens: int  # used when a request gives none
    max_k: int  # the largest number of candidates (low 2, medium 8, high 32)
    think_budget: int | None = None  # `serve --think-budget`: a request's default
    think_budget_message: str = ""


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(body: bytes, kind: type[_Request] = ChatRequest) -> Any:
    """Parse and validate a request body as `kind`; a 400 `ApiError` naming the field when it
    is bad."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(
            f"the request body is not valid JSON ({e})", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", param=where) from None


def to_options(req: _Request, limits: Limits) -> tuple[Prompt, ReasonOptions]:
    """The request as the Reasoner's prompt (a chat's messages, or a raw text) and its
    `ReasonOptions`."""
    try:
        effort = Effort(req.effort) if req.effort else default_effort(limits.max_k)
    except ValueError:
        raise bad_request(
            f"effort must be one of {', '.join(e.value for e in Effort)}", param="effort"
        ) from None
    fixed = effort.mode.k
    runs = fixed or Effort.LOW.k  # auto and adaptive: at least low's candidates
    if not 1 <= req.n <= runs:
        what = f"generates {runs}" if fixed else f"may generate as few as {runs}"
        what = f"effort {effort.value} {what}"
        raise bad_request(
            f"n must be between 1 and the candidates the request runs ({what}); the n best "
            "distinct candidates are returned",
            param="n",
        )
    prompt = _prompt_of(req)
    given = [t for t in (req.max_completion_tokens, req.max_tokens) if t is not None]
    max_tokens = given[0] if given else limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise bad_request(
            f"max_tokens ({max_tokens}) is above this server's limit of {limits.max_tokens}",
            param="max_tokens",
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(
            f"stop: at most {MAX_STOP_STRINGS} strings of up to {MAX_STOP_CHARS} characters",
            param="stop",
        )
    try:
        options = ReasonOptions(
            effort=effort,
            latency_budget=req.latency_budget,
            memory_budget=req.memory_budget,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
            strategy=req.strategy,
            max_new_tokens=max_tokens,
            allow_degrade=req.allow_degrade,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            stop=stop,
            raw=isinstance(req, TextRequest),
            think_budget=req.thinking_budget_tokens
            if req.thinking_budget_tokens is not None
            else limits.think_budget,
            think_budget_message=limits.think_budget_message,
            max_k=limits.max_k,  # auto chooses among the efforts within the server's limit
            kv_cache=req.kv_cache,
            cache_prompt=req.cache_prompt,
        )
    except InvalidRequestError as e:  # the one check of the values: mapped to the API's names
        raise bad_request(str(e), param=_PARAMS.get(e.param, e.param)) from None
    return prompt, options


def _prompt_of(req: _Request) -> Prompt:
    """A chat's messages, or a text request's one raw prompt; what the route cannot do refused."""
    if isinstance(req, ChatRequest):
        if req.tools or req.functions:
            raise bad_request("tools are not supported", param="tools")
        return [{"role": _role(m.role), "content": m.text()} for m in req.messages]
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("prompt: one prompt per request (a string)", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("prompt: must not be empty", param="prompt")
    for name, bad in (
        ("echo", req.echo),
        ("suffix", req.suffix is not None),
        ("logprobs", req.logprobs),
        ("best_of", req.best_of not in (None, 1)),
    ):
        if bad:
            raise bad_request(f"{name} is not supported (use n and effort)", param=name)
    return prompt


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def default_effort(max_k: int) -> Effort:
    """The Reasoner's default (medium), or low when the server allows fewer candidates."""
    return Effort.MEDIUM if Effort.MEDIUM.k <= max_k else Effort.LOW


def ranked(result: ReasonResult, n: int) -> list[CandidateView]:
    """The n best candidates by the request's selector: its choice first, then the others by the
    signal it ranks with (the SPRM trajectory score where there is one, else the mean token
    log-probability), candidates with an answer not given yet before repeats, cut-off ones last."""
    chosen = result.chosen_candidate
    rest = [c for i, c in enumerate(result.candidates) if i != result.chosen]

    def key(c: CandidateView) -> tuple[bool, float]:
        v = c.score if chosen.score is not None else c.mean_logprob
        return (c.truncated, -(v if v is not None else -math.inf))

    rest.sort(key=key)
    seen, first, repeats = {chosen.answer.strip()}, [], []
    for c in rest:
        (repeats if c.answer.strip() in seen else first).append(c)
        seen.add(c.answer.strip())
    return [chosen, *first, *repeats][:n]


class Completion:
    """Builds one request's response objects (shared id, creation time and model name); `n`
    choices, the best first (`ranked`)."""

    def __init__(self, model: str, n: int = 1, *, thinks: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.thinks = thinks  # the model has think markup: choices carry reasoning_content

    def response(self, result: ReasonResult, seed: int, *, capped: bool = False) -> dict[str, Any]:
        """The non-streaming `chat.completion` object."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices(result, self.n, lambda c: {"message": message(c, self.thinks)}),
            "usage": usage(result),
            "metastone": extension(result, seed, capped=capped),
        }

    def chunk(
        self,
        delta: dict[str, Any] | None = None,
        *,
        finish: str | None = None,
        metastone: dict[str, Any] | None = None,
        usage: dict[str, int] | None = None,
        choices: bool = True,
        index: int = 0,
    ) -> dict[str, Any]:
        """One `chat.completion.chunk` of a stream."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": index, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
            ]
            if choices
            else [],
        }
        if usage is not None:
            out["usage"] = usage
        if metastone is not None:
            out["metastone"] = metastone
        return out


def choice_finish(c: CandidateView) -> str:
    """OpenAI's finish reason of a candidate: `stop` when it ended its turn, else `length`."""
    return "length" if c.truncated else "stop"


def finish_reason(result: ReasonResult) -> str:
    """OpenAI's finish reason of the chosen candidate."""
    return choice_finish(result.chosen_candidate)


def choices(
    result: ReasonResult, n: int, body: Callable[[CandidateView], dict[str, Any]]
) -> list[dict[str, Any]]:
    """The n best candidates (`ranked`) as a response's choices, each `body(c)` (its `message`
    or `text`) with its finish reason and `metastone` (candidate index, score, short answer)."""
    return [
        {
            "index": i,
            **body(c),
            "finish_reason": choice_finish(c),
            "logprobs": None,
            "metastone": {"candidate": c.index, "score": c.score, "answer": c.answer},
        }
        for i, c in enumerate(ranked(result, n))
    ]


def usage(result: ReasonResult) -> dict[str, int]:
    """Token counts: the prompt once (its cache is shared), every candidate's generated tokens."""
    prompt = int(result.timings.get("prompt_tokens", 0))
    completion = sum(c.tokens for c in result.candidates)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def extension(result: ReasonResult, seed: int, *, capped: bool = False) -> dict[str, Any]:
    """The `metastone` field: `reason --json`'s object (every candidate, its text, token ids and
    step scores; the scheduler's decision; timings; its `warnings`), the seed that reproduces it,
    and `capped`: True when the server's `--max-request-seconds` stopped the generation."""
    return {**result.reason_json(), "seed": seed, "capped": capped}


def event_json(ev: Event) -> dict[str, Any]:
    """An engine event as a stream item of the `metastone.events` list."""
    if isinstance(ev, TokenEvent):
        return {"type": "token", "candidate": ev.candidate, "text": ev.text}
    if isinstance(ev, StepEvent):
        return {
            "type": "step",
            "candidate": ev.candidate,
            "position": ev.position,
            "score": _finite(ev.score),
            "n_steps": ev.n_steps,
            "running_score": _finite(ev.running_score),
            "confidence": ev.confidence,
        }
    if isinstance(ev, FinishEvent):
        return {
            "type": "finish",
            "candidate": ev.candidate,
            "text": ev.text_tail,
            "finish_reason": ev.result.finish_reason.value,
            "score": _finite(ev.result.score),
            "tokens": ev.result.n_tokens,
            "stopped_early": stopped_early(ev.result),
        }
    if isinstance(ev, WaveEvent):  # adaptive compute: a wave starts or ends, or the run settled
        return {
            "type": "wave",
            "wave": ev.wave,
            "phase": ev.phase,
            "size": ev.size,
            "candidates": ev.candidates,
            "reason": ev.reason,
        }
    raise ApiError(500, f"unknown event {type(ev).__name__}", type="server_error")


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
