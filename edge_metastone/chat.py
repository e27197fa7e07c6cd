"""Render a model's chat template in a sandbox (templates come from model files: untrusted)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_metastone.errors import InvalidRequestError

# Used when a model file carries no template: the Qwen2 / MetaStone format.
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template, rendered in jinja2's immutable sandbox."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        self.source = source or DEFAULT_TEMPLATE
        try:
            self._template = env.from_string(self.source)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the model's chat template does not compile: {e}") from None
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for `messages` (each {'role', 'content'})."""
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError("each message needs a string 'role' and 'content'")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self._special,
            )
        except jinja2.exceptions.SecurityError as e:
            raise InvalidRequestError(f"the chat template tried an unsafe operation: {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequestError(f"the chat template failed: {e}") from None
