"""The tool loop's protocol, with scripted model replies (a fake backend) and a fake sandbox:
calls are run, results go back as role "tool" messages, --max-turns holds, bad calls
become readable tool results, sessions save and load."""

from __future__ import annotations

import json

import httpx
import pytest

from arle_runtime.agent.loop import Agent, LocalBackend, RemoteBackend, Reply, TurnStats
from arle_runtime.agent.sandbox import Limits, RunResult
from arle_runtime.errors import ArleError
from arle_runtime.generate import GenerationResult
from arle_runtime.sampler import SamplingParams

STATS = TurnStats(prompt_tokens=10, completion_tokens=5, ttft_s=0.01, total_s=0.05)


def call(name, args, cid="call_1"):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


class ScriptedBackend:
    """Replies in order; records the messages and tools each turn saw."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.seen = []

    def describe(self):
        return "scripted"

    def complete(self, messages, tools, params, on_text):
        self.seen.append((json.loads(json.dumps(messages)), tools))
        content, calls = self.replies.pop(0)
        if isinstance(content, BaseException):
            on_text("partial ")
            raise content
        on_text(content)
        return Reply(content, calls, "tool_calls" if calls else "stop", STATS)


class FakeSandbox:
    usable = True
    limits = Limits()

    def __init__(self):
        self.ran = []

    def run_python(self, code):
        self.ran.append(("python", code))
        return RunResult("42\n", "", 0)

    def run_shell(self, command):
        self.ran.append(("shell", command))
        return RunResult("", "boom\n", 1)


def agent_with(*replies, max_turns=4, tools=True):
    backend, box = ScriptedBackend(*replies), FakeSandbox()
    return Agent(backend, SamplingParams(), box, tools, max_turns), backend, box


def test_a_tool_call_is_run_and_its_result_fed_back():
    agent, backend, box = agent_with(("", [call("python", {"code": "print(6*7)"})]), ("It is 42.", []))
    result = agent.ask("what is 6*7?")
    assert (result.text, result.turns, result.tool_calls_executed) == ("It is 42.", 2, 1)
    assert box.ran == [("python", "print(6*7)")]
    assert [t["function"]["name"] for t in backend.seen[0][1]] == ["python", "shell"]
    second = backend.seen[1][0]
    assert [m["role"] for m in second] == ["user", "assistant", "tool"]
    assert second[1]["content"] is None and second[1]["tool_calls"][0]["id"] == "call_1"
    assert second[2] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    assert len(agent.stats) == 2


def test_shell_failures_and_bad_calls_are_results_not_errors():
    agent, backend, box = agent_with(
        ("", [call("shell", {"command": "false"}, "a"), call("rm_rf", {}, "b"), call("python", {"src": 1}, "c")]),
        ("done", []))
    result = agent.ask("go")
    tools = [m for m in agent.messages if m["role"] == "tool"]
    assert tools[0]["content"] == "[stderr]\nboom\n[exit code 1]"
    assert "there is no tool 'rm_rf'" in tools[1]["content"]
    assert 'python takes {"code": "..."}' in tools[2]["content"]
    assert result.tool_calls_executed == 3 and box.ran == [("shell", "false")]


def test_max_turns_stops_the_loop_and_closes_open_calls():
    loop = [("", [call("python", {"code": "1"})])] * 3
    agent, backend, box = agent_with(*loop, max_turns=2)
    result = agent.ask("loop forever")
    assert result.max_turns_reached and result.turns == 2 and result.tool_calls_executed == 1
    assert agent.messages[-1]["content"] == "[not run: the limit of 2 turns was reached]"


def test_no_tools_sends_no_tools_and_runs_nothing():
    agent, backend, box = agent_with(("hello", []), tools=False)
    assert agent.ask("hi").text == "hello"
    assert backend.seen[0][1] is None


def test_interrupt_keeps_the_partial_answer():
    agent, backend, _ = agent_with((KeyboardInterrupt(), []))
    result = agent.ask("tell me a story")
    assert result.interrupted and result.text == "partial "
    assert agent.messages[-1] == {"role": "assistant", "content": "partial "}


def test_a_failed_first_turn_forgets_the_message():
    agent, _, _ = agent_with((ArleError("The prompt is too long."), []))
    with pytest.raises(ArleError):
        agent.ask("x" * 10)
    assert agent.messages == []


def test_save_load_round_trip_and_bad_files(tmp_path):
    agent, _, _ = agent_with(("", [call("python", {"code": "print(6*7)"})]), ("It is 42.", []))
    agent.ask("what is 6*7?")
    path = tmp_path / "chat.json"
    agent.save(path)
    assert json.loads(path.read_text())["version"] == 1
    other, _, _ = agent_with()
    other.load(path)
    assert other.messages == agent.messages
    md = other.to_markdown()
    assert "**user**" in md and "```python\nprint(6*7)\n```" in md and "It is 42." in md
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard"}], "version": 1}')
    with pytest.raises(ArleError, match="messages\\[0\\] must be an object with a role"):
        other.load(tmp_path / "bad.json")
    with pytest.raises(ArleError, match="No such file"):
        other.load(tmp_path / "missing.json")
    (tmp_path / "v9.json").write_text('{"messages": [], "version": 9}')
    with pytest.raises(ArleError, match="session version 9"):
        other.load(tmp_path / "v9.json")


class FakeSession:
    """Session.encode_chat / generate, answering a Hermes <tool_call> in pieces."""

    def __init__(self, text):
        self.text, self.tools_seen = text, []

    def encode_chat(self, messages, tools=None):
        self.tools_seen.append(tools)
        return [1, 2, 3]

    def generate(self, prompt_ids, params, on_text=None):
        for i in range(0, len(self.text), 7):
            on_text(self.text[i:i + 7])
        return GenerationResult(self.text, [5] * 9, 3, "stop", 0.01, 0.1)


def test_local_backend_parses_hermes_calls_and_hides_the_tags():
    session = FakeSession('Let me compute.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}'
                          '\n</tool_call>')
    shown = []
    reply = LocalBackend(session).complete([{"role": "user", "content": "hi"}], [{"x": 1}], SamplingParams(),
                                           shown.append)
    assert "".join(shown) == "Let me compute."
    assert reply.content == "Let me compute." and reply.tool_calls[0]["function"]["name"] == "python"
    assert json.loads(reply.tool_calls[0]["function"]["arguments"]) == {"code": "print(1)"}
    plain = LocalBackend(FakeSession("<tool_call>not parsed</tool_call>")).complete([], None, SamplingParams(),
                                                                                     shown.append)
    assert plain.tool_calls == [] and plain.content == "<tool_call>not parsed</tool_call>"


def _sse(*events):
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def test_remote_backend_streams_text_and_assembles_tool_calls():
    requests = []

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "smol"}]})
        requests.append(json.loads(request.content))
        body = _sse(
            {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"delta": {"content": "Running"}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                    "function": {"name": "shell", "arguments": '{"comm'}}]}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'and": "ls"}'}}]}}]},
            {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
            {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 12}})
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    backend = RemoteBackend("http://test:1", "k", transport=httpx.MockTransport(handler))
    shown = []
    reply = backend.complete([{"role": "user", "content": "ls"}], [{"type": "function"}], SamplingParams(),
                             shown.append)
    assert backend.model == "smol" and requests[0]["model"] == "smol" and requests[0]["stream"] is True
    assert "".join(shown) == "Running" and reply.finish_reason == "tool_calls"
    assert reply.tool_calls == [call("shell", {"command": "ls"}, "call_9")]
    assert (reply.stats.prompt_tokens, reply.stats.completion_tokens) == (20, 12)


def test_remote_backend_turns_http_errors_into_one_sentence():
    def handler(request):
        return httpx.Response(401, json={"error": {"message": "Invalid API key.", "type": "x"}})

    with pytest.raises(ArleError, match="answered HTTP 401: Invalid API key."):
        RemoteBackend("http://test:1", transport=httpx.MockTransport(handler))
