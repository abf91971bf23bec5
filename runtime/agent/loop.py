"""The conversation and the tool loop, over a backend that answers one chat turn.

A backend's `complete(messages, tools, params, on_text)` streams the visible text to
`on_text` and returns a Reply whose `tool_calls` are in the OpenAI shape. LocalBackend
drives a loaded bundle (the model writes Hermes `<tool_call>` blocks, parsed by
runtime/tool_calls.py); RemoteBackend talks to any OpenAI-compatible server over
streaming SSE (httpx). The Agent appends each answer, runs its calls in the sandbox and
feeds the results back as `role: "tool"` messages, up to `max_turns` model calls."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..errors import ArleError
from ..sampler import SamplingParams
from ..tool_calls import ToolCallStream, parse_tool_calls
from .sandbox import Sandbox
from .tools import TOOL_SPECS, ToolOutcome, execute

SESSION_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float

    @property
    def tok_s(self) -> float:
        n = self.completion_tokens - 1
        return n / (self.total_s - self.ttft_s) if n > 0 and self.total_s > self.ttft_s else 0.0


@dataclass(frozen=True)
class Reply:
    content: str
    tool_calls: list[dict]
    finish_reason: str | None
    stats: TurnStats


class Backend(Protocol):
    def describe(self) -> str: ...

    def complete(self, messages: list[dict], tools: list[dict] | None, params: SamplingParams,
                 on_text: Callable[[str], None]) -> Reply: ...


class LocalBackend:
    """A loaded bundle (runtime/session.py)."""

    def __init__(self, session):
        self.session = session

    def describe(self) -> str:
        m = self.session.bundle.manifest
        quant = m.get("quantization", {})
        quant = quant.get("scheme", quant.get("name", "")) if isinstance(quant, dict) else quant
        target = m.get("target", {})
        target = target.get("name", target.get("kind", "")) if isinstance(target, dict) else target
        facts = ", ".join(str(x) for x in (quant, target) if x)
        return f"bundle {self.session.bundle.name}" + (f" ({facts})" if facts else "")

    def complete(self, messages, tools, params, on_text) -> Reply:
        prompt_ids = self.session.encode_chat(messages, tools)
        # The raw <tool_call> text is held back so the user sees only the prose.
        parser = ToolCallStream() if tools else None

        def feed(delta: str) -> None:
            text = parser.feed(delta)[0] if parser else delta
            if text:
                on_text(text)

        result = self.session.generate(prompt_ids, params, on_text=feed)
        if parser:
            rest = parser.finish()[0]
            if rest:
                on_text(rest)
        content, calls = parse_tool_calls(result.text) if tools else (result.text, [])
        stats = TurnStats(result.prompt_tokens, result.completion_tokens, result.ttft_s, result.total_s)
        return Reply(content or "", [c.to_openai() for c in calls], result.finish_reason, stats)


class RemoteBackend:
    """Any OpenAI-compatible server (`arle-runtime serve` first); httpx is imported here only."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0,
                 transport=None):
        try:
            import httpx
        except ImportError:
            raise ArleError("--url needs the httpx package; install it with `pip install httpx`.") from None
        self._httpx = httpx
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers,
                                   transport=transport)  # tests pass an httpx.MockTransport
        self.model = model or self._first_model()

    def describe(self) -> str:
        return f"{self.model} at {self.base}"

    def _error(self, response) -> ArleError:
        try:
            message = response.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - any non-OpenAI body: show its start
            message = response.text[:200]
        return ArleError(f"{self.base} answered HTTP {response.status_code}: {message}")

    def _first_model(self) -> str:
        try:
            response = self.client.get(f"{self.base}/models")
        except self._httpx.HTTPError as e:
            raise ArleError(f"Cannot reach {self.base} ({e}); is the server running?") from None
        if response.status_code != 200:
            raise self._error(response)
        try:
            return response.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ArleError(f"{self.base}/models lists no model; give one with --model.") from None

    def complete(self, messages, tools, params, on_text) -> Reply:
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if tools:
            body["tools"] = tools
        content, calls, finish, usage = [], {}, None, {}
        start, first = time.perf_counter(), None
        chunks = 0
        try:
            with self.client.stream("POST", f"{self.base}/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._error(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise ArleError(f"{self.base} failed mid-answer: {event['error'].get('message')}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content") or delta.get("tool_calls"):
                            first = first or time.perf_counter()
                            chunks += 1
                        if delta.get("content"):
                            content.append(delta["content"])
                            on_text(delta["content"])
                        for tc in delta.get("tool_calls") or []:
                            entry = calls.setdefault(tc.get("index", len(calls)), {
                                "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                            entry["id"] = tc.get("id") or entry["id"]
                            fn = tc.get("function") or {}
                            entry["function"]["name"] += fn.get("name") or ""
                            entry["function"]["arguments"] += fn.get("arguments") or ""
                        finish = choice.get("finish_reason") or finish
        except self._httpx.HTTPError as e:
            raise ArleError(f"The connection to {self.base} failed ({e}).") from None
        now = time.perf_counter()
        stats = TurnStats(usage.get("prompt_tokens", 0), usage.get("completion_tokens", chunks), (first or now) - start,
                          now - start)
        return Reply("".join(content), [calls[i] for i in sorted(calls)], finish, stats)


@dataclass
class AgentResult:
    text: str  # the last answer's text
    turns: int  # model calls
    tool_calls_executed: int
    finish_reason: str | None = None
    interrupted: bool = False
    max_turns_reached: bool = False


@dataclass
class Agent:
    backend: Backend
    params: SamplingParams
    sandbox: Sandbox | None = None
    tools: bool = True
    max_turns: int = 4
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    stats: list[TurnStats] = field(default_factory=list)

    def __post_init__(self):
        self.tools = self.tools and self.sandbox is not None and self.sandbox.usable
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_text: Callable[[str], None] = lambda s: None,
            on_tool: Callable[[str, ToolOutcome | dict], None] = lambda kind, x: None) -> AgentResult:
        """One user message and the model's answers until one calls no tool (or max_turns).
        Ctrl-C stops the running generation or tool: what was shown so far is kept."""
        self.messages.append({"role": "user", "content": text})
        turns = executed = 0
        while True:
            turns += 1
            shown: list[str] = []

            def show(delta: str) -> None:
                shown.append(delta)
                on_text(delta)

            try:
                reply = self.backend.complete(self.messages, TOOL_SPECS if self.tools else None, self.params, show)
            except KeyboardInterrupt:
                self.messages.append({"role": "assistant", "content": "".join(shown)})
                return AgentResult("".join(shown), turns, executed, "abort", interrupted=True)
            except ArleError:
                if turns == 1:  # nothing was answered (e.g. the prompt is too long): forget the message
                    self.messages.pop()
                raise
            self.stats.append(reply.stats)
            message = {"role": "assistant", "content": reply.content or None if reply.tool_calls else reply.content}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            self.messages.append(message)
            if not reply.tool_calls:
                return AgentResult(reply.content, turns, executed, reply.finish_reason)
            last = turns >= self.max_turns
            pending = list(reply.tool_calls)
            try:
                while pending:
                    call = pending[0]
                    if last:
                        self._tool_message(call, f"[not run: the limit of {self.max_turns} turns was reached]")
                    else:
                        on_tool("call", call)
                        outcome = execute(call["function"]["name"], call["function"]["arguments"], self.sandbox)
                        executed += 1
                        on_tool("result", outcome)
                        self._tool_message(call, outcome.text)
                    pending.pop(0)
            except KeyboardInterrupt:  # the sandbox killed the tool's processes; close the open calls
                for call in pending:
                    self._tool_message(call, "[interrupted by the user]")
                return AgentResult(reply.content, turns, executed, "abort", interrupted=True)
            if last:
                return AgentResult(reply.content, turns, executed, reply.finish_reason, max_turns_reached=True)

    def _tool_message(self, call: dict, content: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call.get("id") or "", "content": content})

    # --- sessions ------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        Path(path).expanduser().write_text(json.dumps({"version": SESSION_VERSION, "messages": self.messages},
                                                      indent=1, ensure_ascii=False) + "\n")

    def load(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArleError(f"No such file: {path}.") from None
        except (OSError, ValueError) as e:
            raise ArleError(f"{path} is not a readable JSON file ({e}).") from None
        self.messages = check_session(data, str(path))

    def to_markdown(self) -> str:
        return transcript_markdown(self.messages)


def check_session(data, where: str) -> list[dict]:
    """A saved session ({"version": 1, "messages": [...]}) -> its messages; ArleError if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ArleError(f"{where} is not an arle session (expected {{\"version\": 1, \"messages\": [...]}}).")
    if data.get("version") != SESSION_VERSION:
        raise ArleError(f"{where} has session version {data.get('version')!r}; this arle reads version "
                        f"{SESSION_VERSION}.")
    for i, m in enumerate(data["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content") or "", str):
            raise ArleError(f"{where}: messages[{i}] must be an object with a role ({', '.join(ROLES)}) "
                            "and a string content.")
    return data["messages"]


def transcript_markdown(messages: list[dict]) -> str:
    out = ["# arle agent transcript", ""]
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out += ["**tool result**", "", "```", content, "```", ""]
            continue
        out += [f"**{role}**", ""] + ([content, ""] if content else [])
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            try:
                args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
            except ValueError:
                args = fn["arguments"]
            source = args.get("code", args.get("command")) if isinstance(args, dict) else None
            lang = "python" if fn["name"] == "python" else "sh"
            body = source if isinstance(source, str) else json.dumps(args, ensure_ascii=False)
            out += [f"*calls `{fn['name']}`:*", "", f"```{lang}", body, "```", ""]
    return "\n".join(out).rstrip() + "\n"
