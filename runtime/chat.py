"""Chat templates, rendered with jinja2 in a sandbox (templates come from model files).

Tools: a template whose source mentions `tools` gets them as the jinja variable `tools`;
for one that does not (SmolLM2's), the tools go into a Hermes-style system section and
earlier calls / tool results into plain turns (runtime/tool_calls.py)."""

from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ArleError
from .tool_calls import messages_for_template, messages_with_tools_prompt, template_handles_tools


def _raise(message: str):
    raise ArleError(f"The chat template refused the conversation: {message}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        try:
            self._template = _environment().from_string(source)
        except TemplateError as e:
            raise ArleError(f"The bundle's chat template does not parse ({e}).") from None
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.handles_tools = template_handles_tools(source)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        if self.handles_tools:
            messages, tools = messages_for_template(messages), tools or None
        else:
            messages, tools = messages_with_tools_prompt(messages, tools or []), None
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ArleError:
            raise
        except TemplateError as e:
            raise ArleError(f"The chat template failed on this conversation ({e}).") from None
