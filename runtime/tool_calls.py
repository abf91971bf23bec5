"""Function calling in the Qwen / Hermes format, as pure functions (the server and the agent share them).

The model calls a tool by writing, possibly several times in one answer:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block may also hold a JSON list of such objects (SmolLM2's format). `parse_tool_calls`
splits a finished text into (content, calls); `ToolCallStream` does the same on streamed
deltas. `validate_tools` / `validate_tool_choice` check the OpenAI
request shapes at the edge. `messages_for_template` prepares a conversation for a chat
template that knows `tools` (Qwen's do); `messages_with_tools_prompt` is for one that
does not (SmolLM2's): it adds a Hermes-style system section listing the tools and
writes earlier calls and their results as text the model has seen in that format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .errors import ArleError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MENTIONS_TOOLS = re.compile(r"\btools\b")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it
    id: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # auto | none | required | function
    name: str | None = None  # the function, for mode "function"

    def tools_to_show(self, tools: list[dict]) -> list[dict]:
        """The tools the prompt lists: none for "none", only the named one for a named choice."""
        if self.mode == "none":
            return []
        if self.mode == "function":
            return [t for t in tools if t["function"]["name"] == self.name]
        return tools


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- request validation ------------------------------------------------------------------


def validate_tools(tools) -> list[dict]:
    """OpenAI `tools` -> a clean list of {"type": "function", "function": {...}}; ArleError with `param`."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ArleError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects.",
                        param="tools", code="invalid_type")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ArleError(f"{where} must be an object.", param=where, code="invalid_type")
        if tool.get("type", "function") != "function":
            raise ArleError(f"{where}.type must be \"function\", got {json.dumps(tool.get('type'))[:40]}.",
                            param=f"{where}.type", code="invalid_value")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ArleError(f"{where}.function must be an object with a 'name'.", param=f"{where}.function",
                            code="invalid_type")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ArleError(f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.', "
                            f"got {json.dumps(name)[:80]}.", param=f"{where}.function.name", code="invalid_value")
        if name in seen:
            raise ArleError(f"{where}.function.name '{name}' is given twice.", param=f"{where}.function.name",
                            code="invalid_value")
        seen.add(name)
        clean = {"name": name}
        description = fn.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise ArleError(f"{where}.function.description must be a string.",
                                param=f"{where}.function.description", code="invalid_type")
            clean["description"] = description
        parameters = fn.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ArleError(f"{where}.function.parameters must be a JSON Schema object, "
                                f"got {json.dumps(parameters)[:80]}.", param=f"{where}.function.parameters",
                                code="invalid_type")
            clean["parameters"] = parameters
        out.append({"type": "function", "function": clean})
    return out


def validate_tool_choice(choice, tools: list[dict]) -> ToolChoice:
    """OpenAI `tool_choice` ("auto", "none", "required" or {"type": "function", "function": {"name"}})."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ArleError(f"'tool_choice' must be \"auto\", \"none\", \"required\" or a named function, "
                            f"got {json.dumps(choice)[:40]}.", param="tool_choice", code="invalid_value")
        if choice == "required" and not tools:
            raise ArleError("'tool_choice' \"required\" needs 'tools'.", param="tool_choice", code="invalid_value")
        return ToolChoice(choice if tools else "none")
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ArleError("'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
                        param="tool_choice", code="invalid_type")
    if name not in {t["function"]["name"] for t in tools}:
        raise ArleError(f"'tool_choice' names the function '{name}', which is not in 'tools'.",
                        param="tool_choice", code="invalid_value")
    return ToolChoice("function", name)


def validate_message_tool_fields(message: dict, where: str) -> None:
    """An assistant message's `tool_calls` and a tool message's `tool_call_id`, as OpenAI sends them."""
    calls = message.get("tool_calls")
    if calls is not None:
        if message["role"] != "assistant" or not isinstance(calls, list):
            raise ArleError(f"{where}.tool_calls must be a list, on an assistant message.",
                            param=f"{where}.tool_calls", code="invalid_type")
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments", ""), (str, dict)):
                raise ArleError(f"{where}.tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                                "{\"name\": ..., \"arguments\": \"JSON\"}}.",
                                param=f"{where}.tool_calls[{j}]", code="invalid_type")
    if "tool_call_id" in message and not isinstance(message["tool_call_id"], str):
        raise ArleError(f"{where}.tool_call_id must be a string.", param=f"{where}.tool_call_id",
                        code="invalid_type")


# --- prompts -------------------------------------------------------------------------------


def template_handles_tools(source: str) -> bool:
    """Whether a chat template renders `tools` itself (its source mentions the variable)."""
    return bool(_MENTIONS_TOOLS.search(source))


def tools_system_prompt(tools: list[dict]) -> str:
    """The Hermes / Qwen 2.5 system section that lists the tools and the call format."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def _arguments_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return arguments
    return arguments


def format_tool_call(name: str, arguments) -> str:
    """One call as the model writes it."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': _arguments_object(arguments)}, ensure_ascii=False)}\n{CLOSE}"


def messages_for_template(messages: list[dict]) -> list[dict]:
    """For a template that knows tools: call arguments as objects (Qwen templates `tojson` them)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = c["function"]
                calls.append({**c, "type": "function",
                              "function": {**fn, "arguments": _arguments_object(fn.get("arguments", {}))}})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def messages_with_tools_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template that does not know tools: the tools go into the system message
    (appended to the first one, or a new one first), earlier calls into the assistant's
    text, and tool results into user turns wrapped in <tool_response> (consecutive results
    share one turn), as Qwen 2.5's template writes them."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [format_tool_call(c["function"]["name"], c["function"].get("arguments", {}))
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_responses": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    out = [{k: v for k, v in m.items() if k != "_tool_responses"} for m in out]
    if tools:
        section = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + section) if out[0]["content"] else section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


# --- answers -------------------------------------------------------------------------------


def _calls_from_json(body: str) -> list[ToolCall] | None:
    """The calls in one block: an object, or a list of them (SmolLM2's tool format); None if it is not that."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call_from_object(o) for o in objs]
    return calls if calls and None not in calls else None


def _call_from_object(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(obj["name"], arguments, new_call_id())


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split an answer into its content and its tool calls.

    A block whose JSON is not a call (malformed, or without a "name"), or that is never
    closed, stays in the content as written. Whitespace between text and a call is
    dropped; with calls and no other text the content is None (as OpenAI answers)."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    content += rest
    calls += more
    return (content or None) if calls else content, calls


class ToolCallStream:
    """`parse_tool_calls` on streamed text: `feed(delta)` returns the content that is safe to
    show and the calls completed so far; `finish()` returns what was held back. Text that
    may begin a call (a prefix of "<tool_call>", trailing whitespace) waits for the next
    delta, so the raw tags never reach the client."""

    def __init__(self) -> None:
        self._pending = ""  # text not yet classified
        self._in_call = False
        self._gap = ""  # whitespace before the open call: dropped if it is a call, kept if not
        self._after_call = False  # drop whitespace right after a call
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        shown, calls = [], []
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                body, block = self._pending[len(OPEN):end], self._pending[: end + len(CLOSE)]
                self._pending = self._pending[end + len(CLOSE):]
                self._in_call = False
                found = _calls_from_json(body)
                if found is None:  # not a call after all: it is text
                    shown.append(self._gap + block)
                    self._after_call = False
                else:
                    calls += found
                    self.num_calls += len(found)
                    self._after_call = True
                self._gap = ""
                continue
            if self._after_call:
                self._pending = self._pending.lstrip()
                if not self._pending:
                    break
                self._after_call = False
            start = self._pending.find(OPEN)
            if start >= 0:
                before = self._pending[:start]
                shown.append(before.rstrip())
                self._gap = before[len(before.rstrip()):]
                self._pending = self._pending[start:]
                self._in_call = True
                continue
            keep = _held_suffix(self._pending)
            shown.append(self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return "".join(shown), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the answer: what was held back is content (an unclosed call included)."""
        rest = (self._gap + self._pending) if self._in_call else self._pending
        self._pending, self._gap, self._in_call = "", "", False
        if self._after_call:
            rest = rest.lstrip()
        return rest, []


def _held_suffix(text: str) -> int:
    """How many trailing characters may still turn out to precede or begin a call."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            hold = k
            break
    else:
        hold = 0
    body = text[: len(text) - hold]
    return hold + len(body) - len(body.rstrip())
