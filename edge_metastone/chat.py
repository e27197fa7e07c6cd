"""Render a model's chat template in a sandbox (templates come from model files: untrusted)."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_metastone.errors import InvalidRequestError

# A model file without a template whose vocabulary has ChatML's tokens (the Qwen2 family) gets
# ChatML; its assistant turn opens a thought (`<think>`) only where that is one token too.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_THINK_TEMPLATE = CHATML_TEMPLATE.replace("assistant\\n'", "assistant\\n<think>\\n'")
DEFAULT_TEMPLATE = CHATML_THINK_TEMPLATE  # the Qwen2 / MetaStone format
NO_TEMPLATE = (
    "this model file has no chat template and its vocabulary has no ChatML tokens, so a chat "
    "prompt has no format to take: give the prompt as raw text (--raw; the API's raw=True)"
)


@dataclass(frozen=True)
class PromptFormat:
    """How a model's chat prompts are written: `template` (None: raw prompts only) and what
    `describe` says of it, for `inspect`, `doctor --model`, `--json` warnings and the page."""

    template: str | None
    name: str  # "file", "chatml", "chatml+think" or "none"
    describe: str
    warning: str | None = None  # said with every chat request when the format is a fallback


def prompt_format(file_template: str | None, control_texts: Sequence[str]) -> PromptFormat:
    """The file's own template where it has one; else ChatML where the vocabulary has ChatML's
    tokens (with the `<think>` opening where that is a token), which is what llama-server uses
    for a file without a template; else none: chat prompts are refused (`NO_TEMPLATE`), never
    written in another model's markup."""
    if file_template:
        return PromptFormat(file_template, "file", "the file's chat template")
    have = set(control_texts)
    if {"<|im_start|>", "<|im_end|>"} <= have:
        think = "<think>" in have
        why = "the file has no chat template; its vocabulary has <|im_start|>/<|im_end|>" + (
            " and <think>" if think else ""
        )
        name = "chatml+think" if think else "chatml"
        return PromptFormat(
            CHATML_THINK_TEMPLATE if think else CHATML_TEMPLATE,
            name,
            f"{name} ({why})",
            f"chat prompt written as {name}: {why}",
        )
    return PromptFormat(None, "none", f"none: raw prompts only ({NO_TEMPLATE.split(', so')[0]})")


def dedupe_bos(ids: list[int], bos: int | None) -> list[int]:
    """`ids` with a doubled leading BOS made single (an added one and the text's own)."""
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


MAX_TEMPLATE_OUTPUT = 4 << 20  # characters (or items) one value, or the output, may have
MAX_TEMPLATE_BUILT = 16 * MAX_TEMPLATE_OUTPUT  # characters all the values one render builds total
MAX_TEMPLATE_STEPS = 2_000_000  # range() elements, loop iterations, calls and lookups per render
MAX_TEMPLATE_SECONDS = 2.0
MAX_INT_BITS = 1 << 16  # the largest integer `*` and `**` may build
MAX_FORMAT_NUMBER = 4096  # the widest field or precision a format spec may ask for
MAX_REGEX_INPUT = 1 << 14  # striptags / urlize: their regular expressions are quadratic


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson` (jinja2's own escapes HTML characters and sorts keys)."""
    width = indent if isinstance(indent, int) else len(str(indent or ""))
    if width > 64:
        raise SecurityError("the template asks for too wide an indent")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Budget:
    """The work one render may do: steps, wall time (checked at every step) and the characters
    it builds (checked before each value is built)."""

    def __init__(self) -> None:
        self.steps = 0
        self.built = 0
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def spend(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_TEMPLATE_STEPS:
            raise SecurityError("the template does too much work")
        if time.monotonic() > self.deadline:
            raise SecurityError(f"the template took longer than {MAX_TEMPLATE_SECONDS} s")

    def build(self, size: float) -> None:
        """About to build a value of `size` characters (or items): refuse it if too large."""
        self.spend()
        if size > MAX_TEMPLATE_OUTPUT:
            raise SecurityError("the template builds too large a value")
        self.built += int(size)
        if self.built > MAX_TEMPLATE_BUILT:
            raise SecurityError("the template builds too large a total")

    def built_value(self, value: object) -> object:
        """Count a value a call or filter returned (its size was bounded before)."""
        if isinstance(value, (str, list, tuple, dict)):
            self.build(len(value))
        return value


def _size(value: object) -> int:
    """Characters (or items) of a value as a template builds with it."""
    if isinstance(value, (str, list, tuple, dict)):
        return len(value)
    return len(str(value)) if isinstance(value, (int, float)) else 0


def _as_int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) else default


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _format_size(fmt: str, specs: Sequence[str], args: Sequence[object]) -> int:
    """An upper bound of what formatting `fmt` builds: each field (`specs`: the numbers each asks
    for) at most as wide as its number or the widest argument."""
    widest = max((len(str(a)) for a in args), default=0)
    for spec in specs:
        if "*" in spec or "{" in spec:
            raise SecurityError("the template's format takes its width from an argument")
        if any(int(n) > MAX_FORMAT_NUMBER for n in re.findall(r"\d+", spec)):
            raise SecurityError("the template's format asks for too wide a field")
    return len(fmt) + len(specs) * (MAX_FORMAT_NUMBER + widest)


def _printf_size(fmt: object, args: object) -> int:
    """`fmt % args` (and the `format` filter)."""
    if not isinstance(fmt, str):
        return 0
    values = args.values() if isinstance(args, dict) else args
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    specs = [m.group(0) for m in _PRINTF.finditer(fmt)]
    return _format_size(fmt, specs, values)


def _str_format_size(fmt: str, args: Sequence[object], kwargs: Mapping[str, object]) -> int:
    """`fmt.format(...)` / `fmt.format_map(...)`."""
    values = [*args, *kwargs.values()]
    try:
        specs = [
            f"{spec or ''}"
            for _, name, spec, _ in string.Formatter().parse(fmt)
            if name is not None
        ]
    except ValueError as e:
        raise SecurityError(f"bad format string: {e}") from None
    return _format_size(fmt, specs, values)


def _binop_size(operator: str, left: object, right: object) -> int:
    """What `left operator right` would build (characters or items); refuses huge integers."""
    seqs = (str, list, tuple)
    if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
        raise SecurityError("the template raises a number to too large a power")
    if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() * abs(right) if operator == "**" else 0
        if max(bits, left.bit_length() + right.bit_length()) > MAX_INT_BITS:
            raise SecurityError("the template builds too large a number")
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, seqs) and isinstance(n, int):
                return len(seq) * max(n, 0)
    if operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
        return len(left) + len(right)
    if operator == "%":
        return _printf_size(left, right)
    return 0


def _method_size(obj: object, args: Sequence[object], kwargs: Mapping[str, object]) -> int:
    """What a str method call would build, for the methods whose result can outgrow their
    string (`'x'.center(2**33)`)."""
    s, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if not isinstance(s, str):
        return 0
    first = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(s), _as_int(first))
    if name == "expandtabs":
        return len(s) + s.count("\t") * max(_as_int(first, 8), 0)
    if name == "replace" and len(args) >= 2:
        return _replace_size(s, args[0], args[1], args[2] if len(args) > 2 else -1)
    if name == "join" and isinstance(first, (list, tuple)):
        return sum(_size(x) for x in first) + len(s) * len(first)
    return 0


def _replace_size(s: object, old: object, new: object, count: object = None) -> int:
    s, old, new = str(s), str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _join_size(value: Sequence[object], d: object = "", attribute: object = None) -> int:
    return sum(_size(x) for x in value) + len(str(d)) * len(value)


def _indent_size(s: object, width: object = 4, *_: object, **__: object) -> int:
    text = str(s)
    w = len(width) if isinstance(width, str) else _as_int(width, 4)
    return len(text) + (text.count("\n") + 1) * max(w, 0)


def _wordwrap_size(
    s: object,
    width: object = 79,
    _b: object = True,
    wrapstring: object = None,
    *_: object,
    **__: object,
) -> int:
    text, w = str(s), max(_as_int(width, 79), 1)
    lines = len(text) // w + text.count("\n") + 1
    return len(text) + lines * len(str(wrapstring if wrapstring is not None else "\n"))


def _regex_input(s: object, *_: object, **__: object) -> int:
    if len(str(s)) > MAX_REGEX_INPUT:
        raise SecurityError("the template runs an HTML filter over too long a text")
    return len(str(s))


def _fill_size(value: object, n: object = 0, fill_with: object = None, **_: object) -> int:
    """batch / slice: `n` rows or slices (padded with `fill_with`)."""
    return _as_int(n)


def _sum_start(iterable: object, attribute: object = None, start: object = 0) -> int:
    if not isinstance(start, (int, float)):
        raise SecurityError("the template sums something other than numbers")
    return 0


# filter -> (value, its arguments) -> what it would build; the other filters build at most in
# proportion to their input (whose size is bounded when it is built)
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda value, width=80, **_: max(len(str(value)), _as_int(width, 80)),
    "indent": _indent_size,
    "format": lambda value, *args, **kwargs: _printf_size(str(value), kwargs or args),
    "join": _join_size,
    "replace": lambda s, old, new, count=None, **_: _replace_size(s, old, new, count),
    "wordwrap": _wordwrap_size,
    "truncate": lambda s, length=255, killwords=False, end="...", **_: len(str(s)) + len(str(end)),
    "batch": _fill_size,
    "slice": _fill_size,
    "sum": _sum_start,
    "striptags": _regex_input,
    "urlize": _regex_input,
}
_MATERIALIZE = frozenset(["join"])  # filters whose input is measured first (a generator: listed)


class _MeteredCodeGenerator(CodeGenerator):
    """jinja2's compiler, with `~` and `for` loops through the sandbox's meter."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if not getattr(node, "metered", False):
            metered = nodes.EnvironmentAttribute("metered_iter", lineno=node.lineno)
            node.iter = nodes.Call(metered, [node.iter], [], None, None, lineno=node.lineno)
            node.metered = True
        super().visit_For(node, frame)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox plus bounds on work, time and size: every call, lookup, loop
    step, operator, filter and concatenation spends a step and checks the time, and whatever can
    build a value larger than its inputs (`*`, `%`, `~`, `format`, `center`, `join`, ...) is
    measured before it is built (templates come from model files: untrusted)."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])
    code_generator_class = _MeteredCodeGenerator
    budget = threading.local()

    def meter(self) -> _Budget:
        """This render's budget (a fresh one outside a render: constant folding at compile)."""
        return getattr(self.budget, "current", None) or _Budget()

    def call(__self, __context, __obj, *args, **kwargs):
        b = __self.meter()
        b.build(_method_size(__obj, args, kwargs))
        return b.built_value(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        self.meter().spend()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.meter().spend()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        self.meter().build(_binop_size(operator, left, right))
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, env = value.__self__, self

        def bounded(*args, **kwargs):
            values = args[0] if value.__name__ == "format_map" and args else kwargs
            env.meter().build(_str_format_size(fmt, args, values))
            return wrapped(*args, **kwargs)

        return bounded

    def concat(self, parts) -> str:
        """Join a block's output (a macro's, a `set` block's, a filter block's)."""
        parts = list(parts)
        self.meter().build(sum(len(p) for p in parts))
        return "".join(parts)

    def checked_concat(self, parts) -> str:
        """`a ~ b ~ ...`"""
        texts = [str(p) for p in parts]
        self.meter().build(sum(len(t) for t in texts))
        return "".join(texts)

    def metered_iter(self, iterable):
        """A `for` loop's items, one step each."""
        b = self.meter()
        for item in iterable:
            b.spend()
            yield item

    def meter_filters(self) -> None:
        """Wrap every filter: a step, the time, and what it would build measured first."""
        for name, f in list(self.filters.items()):
            self.filters[name] = _metered_filter(self, name, f)


def _metered_filter(env: _BoundedSandbox, name: str, f: Callable[..., object]):
    size_of = _FILTER_SIZES.get(name)
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # context / environment first

    @functools.wraps(f)
    def metered(*args, **kwargs):
        b = env.meter()
        if name in _MATERIALIZE and len(args) > skip and not isinstance(args[skip], (str, list)):
            b.spend()
            args = (*args[:skip], list(env.metered_iter(args[skip])), *args[skip + 1 :])
        b.build(size_of(*args[skip:], **kwargs) if size_of is not None else 0)
        return b.built_value(f(*args, **kwargs))

    return metered


def _bounded_range(env: _BoundedSandbox):
    def bounded_range(*args: int) -> range:
        r = range(*args)
        env.meter().spend(len(r))
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
        env.meter_filters()
        env.globals.pop("lipsum", None)  # builds paragraphs by the million on request
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        env.globals["range"] = _bounded_range(env)
        self._env = env
        self.source = source
        try:
            self._template = env.from_string(source) if source is not None else None
        except (jinja2.exceptions.TemplateError, RecursionError, MemoryError) as e:
            raise InvalidRequestError(f"the model's chat template does not compile: {e}") from None
        if variables is None:
            variables = {"bos_token": bos_token, "eos_token": eos_token}
        self._special = {k: v for k, v in variables.items() if isinstance(v, str)}

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` (each {'role', 'content'})."""
        if self._template is None:
            raise InvalidRequestError(NO_TEMPLATE)
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
    normalize: Callable[[str], str] | None = None,
) -> tuple[str, list[int]]:
    """The prompt text and ids of a conversation, for any backend. Only the template's own markup
    becomes control tokens (`tokenize` parses it); text in a message that spells one
    (`<|im_end|>`, `<think>`) stays text: tokenized by `tokenize_text`, and a spelled control
    token one character at a time (tokenizers match added tokens even in plain text). Messages
    are first put in the tokenizer's normal form (`normalize`), so a spelling that only
    normalizing makes (the fullwidth `＜｜im_end｜＞` under NFKC) is found too."""
    if normalize is not None:
        messages = [
            {**m, "content": normalize(m["content"])} if isinstance(m.get("content"), str) else m
            for m in messages
        ]
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
