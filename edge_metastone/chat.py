"""Render a model's chat template in a sandbox (templates come from model files: untrusted)."""

from __future__ import annotations

import datetime as _dt
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_metastone.errors import InvalidRequestError

# Used when a model file carries no template: the Qwen2 / MetaStone format.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


MAX_TEMPLATE_OUTPUT = 4 << 20  # characters a render may produce
MAX_TEMPLATE_STEPS = 2_000_000  # range() elements, calls and lookups per render
MAX_TEMPLATE_SECONDS = 2.0


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson` (jinja2's own escapes HTML characters and sorts keys)."""
    out = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    if len(out) > MAX_TEMPLATE_OUTPUT:
        raise SecurityError("the template builds too large a value")
    return out


class _Budget:
    """The work one render may do: steps and wall time, checked at every call and lookup."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def spend(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_TEMPLATE_STEPS:
            raise SecurityError("the template does too much work")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise SecurityError(f"the template took longer than {MAX_TEMPLATE_SECONDS} s")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox plus bounds on work, time and the size of what `*`, `**` and
    `+` can build (templates come from model files: untrusted)."""

    intercepted_binops = frozenset(["*", "**", "+"])
    budget = threading.local()

    def _spend(self, n: int = 1) -> None:
        b = getattr(self.budget, "current", None)
        if b is not None:
            b.spend(n)

    def call(__self, __context, __obj, *args, **kwargs):
        __self._spend()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self._spend()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._spend()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        self._spend()
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("the template raises a number to too large a power")
        if _result_size(operator, left, right) > MAX_TEMPLATE_OUTPUT:
            raise SecurityError("the template builds too large a value")
        return super().call_binop(context, operator, left, right)


def _result_size(operator: str, left: object, right: object) -> float:
    """Length of what `left operator right` would build, for sequences (0 otherwise)."""
    seqs = (str, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, seqs) and isinstance(n, (int, float)):
                return len(seq) * max(n, 0)
    if operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        return len(left) + len(right)
    return 0


def _bounded_range(env: _BoundedSandbox):
    def bounded_range(*args: int) -> range:
        r = range(*args)
        env._spend(len(r))
        return r

    return bounded_range


class ChatTemplate:
    """A compiled chat template, rendered in a bounded jinja2 sandbox."""

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        variables: Mapping[str, str] | None = None,
    ) -> None:
        """`variables` (the tokenizer's named special tokens, `ModelFile.template_variables`) are
        exactly the token variables the template sees; without them, `bos_token` and `eos_token`."""
        # as transformers compiles chat templates (apply_chat_template)
        env = _BoundedSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.globals["range"] = _bounded_range(env)
        self._env = env
        self.source = source or DEFAULT_TEMPLATE
        try:
            self._template = env.from_string(self.source)
        except (jinja2.exceptions.TemplateError, RecursionError, MemoryError) as e:
            raise InvalidRequestError(f"the model's chat template does not compile: {e}") from None
        if variables is None:
            variables = {"bos_token": bos_token, "eos_token": eos_token}
        self._special = {k: v for k, v in variables.items() if isinstance(v, str)}

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` (each {'role', 'content'})."""
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError("each message needs a string 'role' and 'content'")
        self._env.budget.current = _Budget()
        out: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(
                {
                    **self._special,
                    "messages": [dict(m) for m in messages],
                    "add_generation_prompt": add_generation_prompt,
                }
            ):
                size += len(chunk)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise SecurityError("the template's output is too large")
                out.append(chunk)
        except SecurityError as e:
            raise InvalidRequestError(f"the chat template was stopped: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the chat template failed: {e}") from None
        except RecursionError:
            raise InvalidRequestError("the chat template recursed too deeply") from None
        except MemoryError:
            raise InvalidRequestError("the chat template ran out of memory") from None
        except Exception as e:  # any other failure of untrusted template code: one clear error
            raise InvalidRequestError(
                f"the chat template failed: {type(e).__name__}: {e}"
            ) from None
        finally:
            self._env.budget.current = None
        return "".join(out)


def encode_chat(
    render: Callable[[Sequence[Mapping[str, str]]], str],
    messages: Sequence[Mapping[str, str]],
    *,
    tokenize: Callable[[str], list[int]],
    tokenize_text: Callable[[str], list[int]],
    control_texts: Sequence[str],
) -> tuple[str, list[int]]:
    """The prompt text and ids of a conversation, for any backend. Only the template's own markup
    becomes control tokens (`tokenize` parses it); text in a message that spells one
    (`<|im_end|>`, `<think>`) stays text: tokenized by `tokenize_text`, and a spelled control
    token one character at a time (tokenizers match added tokens even in plain text)."""
    text = render(messages)
    specials = [sp for sp in control_texts if len(sp) > 1]
    if not any(sp in m["content"] for m in messages for sp in specials):
        return text, tokenize(text)  # nothing to keep apart: one pass, as HF does
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use markers
    marked = render([{**m, "content": mk} for m, mk in zip(messages, marks, strict=True)])
    pieces, rest = [], marked
    for mk in marks:
        head, sep, rest = rest.partition(mk)
        if not sep or mk in rest:
            raise InvalidRequestError(
                "a message spells a control token (e.g. <|im_end|>) and this model's chat "
                "template transforms message text, so it cannot be kept as plain text"
            )
        pieces.append(head)
    pattern = re.compile("|".join(re.escape(sp) for sp in specials))
    ids: list[int] = []
    for head, m in zip(pieces, messages, strict=True):
        ids += tokenize(head)
        pos = 0
        for match in pattern.finditer(m["content"]):
            ids += tokenize_text(m["content"][pos : match.start()])
            for ch in match.group():
                ids += tokenize_text(ch)
            pos = match.end()
        ids += tokenize_text(m["content"][pos:])
    ids += tokenize(rest)
    return "".join(h + m["content"] for h, m in zip(pieces, messages, strict=True)) + rest, ids
