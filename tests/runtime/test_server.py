"""`arle-runtime serve`: the OpenAI-compatible server, run as a user would (a subprocess on a
loopback port) and driven with the official `openai` client and with raw httpx.

The tiny random model answers garbage, so tool_calls answers are checked on the real
app over a scripted engine (in process, same HTTP path); the live servers check that
tool requests are accepted and answered in shape. Servers run with ARLE_THREADS=1."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key"
TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, log: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        exe = Path(sys.executable).parent / "arle-runtime"
        self._logf = open(log, "w")
        self.proc = subprocess.Popen(
            [str(exe), "serve", str(bundle), "--port", str(self.port), "--no-verify", *args],
            stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO, env={"ARLE_THREADS": "1", **os.environ},
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server not ready within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logf.close()
        return self.proc.returncode


def running_server(bundle, log_dir, *args):
    """A started, ready server for a module's tests; stopped after them."""
    srv = Server(bundle, log_dir / "server.log", *args)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def bundle_model_name(bundle) -> str:
    return json.loads((bundle / "manifest.json").read_text()).get("name", bundle.name)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    yield from running_server(tiny_bundle, tmp_path_factory.mktemp("server"), "--api-key", KEY)


@pytest.fixture(scope="module")
def model(tiny_bundle) -> str:
    return bundle_model_name(tiny_bundle)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def _post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    hdrs = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers=hdrs, timeout=TIMEOUT, **kw)
    return httpx.post(server.url + path, json=body, headers=hdrs, timeout=TIMEOUT, **kw)


MESSAGES = [{"role": "user", "content": "Say hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}


def _chat_stream_text(client, model) -> str:
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_models(client, model):
    assert [m.id for m in client.models.list().data] == [model]


def test_chat_non_stream_and_stream_agree(client, model):
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert _chat_stream_text(client, model) == choice.message.content


def test_chat_logprobs(client, model):
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_completions_and_include_usage(client, model):
    resp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert resp.object == "text_completion" and resp.usage.completion_tokens <= 6
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stream_says_where_its_time_before_the_headers_went(server, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200
        timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
        r.read()
    assert set(timing) == {"parse", "queue"} and all(0 < float(ms) < 10_000 for ms in timing.values())


def test_32_concurrent_streams_match_alone(client, model):
    alone = _chat_stream_text(client, model)
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda _: _chat_stream_text(client, model), range(32), timeout=60))
    assert texts == [alone] * 32


def test_bad_json_is_400(server):
    r = _post(server, "/v1/chat/completions", b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_missing_and_ill_typed_fields_are_400(server, model):
    r = _post(server, "/v1/chat/completions", {"model": model})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(server, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_bad_temperature_is_400_with_param(server, model):
    r = _post(server, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "temperature": 500})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "temperature" and "temperature" in err["message"]


def test_auth_is_401(server, model):
    body = {"model": model, "messages": MESSAGES, "max_tokens": 1}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT).status_code == 401
    r = _post(server, "/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/healthz", timeout=TIMEOUT).status_code == 200  # probes need no key


def test_unknown_model_is_404(server):
    r = _post(server, "/v1/chat/completions", {"model": "nope", "messages": MESSAGES})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_body_too_large_is_413(server, model):
    r = _post(server, "/v1/completions", {"model": model, "prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413


def test_prompt_too_long_is_400(server, model):
    r = _post(server, "/v1/completions", {"model": model, "prompt": "hello world " * 200, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move(server, client, model):
    before = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    for name in ("arle_requests_total", "arle_prompt_tokens_total", "arle_completion_tokens_total",
                 "arle_time_to_first_token_seconds", "arle_inter_token_latency_seconds",
                 "arle_e2e_request_latency_seconds", "arle_queue_depth", "arle_kv_pages_in_use",
                 "arle_prefix_cache_hit_rate"):
        assert name in before, name
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0)
    after = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    assert _metric(after, "arle_completion_tokens_total") > _metric(before, "arle_completion_tokens_total")
    assert _metric(after, "arle_prompt_tokens_total") > _metric(before, "arle_prompt_tokens_total")
    assert _metric(after, 'arle_requests_total{endpoint="/v1/chat/completions",status="200"}') > \
        _metric(before, 'arle_requests_total{endpoint="/v1/chat/completions",status="200"}')
    assert _metric(after, "arle_e2e_request_latency_seconds_count") > _metric(before, "arle_e2e_request_latency_seconds_count")


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=TIMEOUT).text


def _wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not hold within {timeout} s")


# A system prompt of 3+ full KV pages (16 tokens each) once templated; every prompt below fits the tiny
# model's 64-token context.
SHARED_SYSTEM = ("You are a careful assistant for a small family bakery in Lyon. Answer in one short sentence, "
                 "politely and warmly, and never invent prices, opening hours, or ingredients you do not know for sure.")


def test_shared_system_prompt_hits_the_prefix_cache(server, client, model):
    def ask(question):
        return client.chat.completions.create(
            model=model, max_tokens=2, temperature=0,
            messages=[{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": question}])

    ask("Hi")  # fills the cache
    before = _metrics(server)
    cached = [ask(q).usage.prompt_tokens_details.cached_tokens for q in ("Bread?", "Cake?", "Tea?")]
    after = _metrics(server)
    assert all(c >= 48 for c in cached), cached
    hits = _metric(after, "arle_prefix_cache_hit_tokens_total") - _metric(before, "arle_prefix_cache_hit_tokens_total")
    assert hits >= sum(cached)
    assert _metric(after, "arle_prefix_cache_hit_rate") > 0


def test_invalid_tools_are_400_with_param(server, model):
    bad = [
        ({"type": "function"}, "tools"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], "tools[0].function.parameters"),
    ]
    for tools, param in bad:
        r = _post(server, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "tools": tools})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", err
    r = _post(server, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "tools": [WEATHER],
                                                "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


# --- a server with one running slot, one queue place and 8 KV pages ------------------------------


@pytest.fixture(scope="module")
def narrow_server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("narrow") / "server.log",
                 "--max-batch", "1", "--max-queue", "1", "--kv-pages", "8")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_kv_pages_option_sizes_the_pool(narrow_server):
    assert _metric(_metrics(narrow_server), "arle_kv_pages_total") == 8


def test_full_queue_is_429(narrow_server, model):
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}

    def post(_):
        return httpx.post(narrow_server.url + "/v1/completions", json=body, timeout=TIMEOUT)

    for _ in range(3):  # each round floods 12 requests at 1 running + 1 waiting; retried in case one drains too fast
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12), timeout=60))
        if any(r.status_code == 429 for r in answers):
            break
    codes = {r.status_code for r in answers}
    assert codes <= {200, 429} and 200 in codes and 429 in codes, codes
    err = next(r for r in answers if r.status_code == 429).json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"


def test_bad_kv_pages_is_a_one_line_error(tiny_bundle):
    from conftest import assert_clean_error, run_cli

    for value, says in (("0", "at least 1"), ("10000000000000", "more than")):
        proc = run_cli("arle-runtime", "serve", str(tiny_bundle), "--no-verify", "--kv-pages", value, timeout=60,
                       env={"ARLE_THREADS": "1"})
        assert proc.returncode == 2
        assert_clean_error(proc, says)


def test_a_small_step_budget_chunks_prefill_and_changes_no_answer(tiny_bundle, tmp_path, client, model):
    """--max-batched-tokens 8: a 20-odd-token prompt is prefilled 8 tokens a step, same greedy answer."""
    expected = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    for srv in running_server(tiny_bundle, tmp_path, "--max-batched-tokens", "8"):
        small = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", timeout=TIMEOUT, max_retries=0)
        got = small.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
        assert got.usage.prompt_tokens > 8
        assert got.choices[0].message.content == expected.choices[0].message.content


def test_a_step_budget_below_the_batch_is_a_one_line_error(tiny_bundle):
    from conftest import assert_clean_error, run_cli

    proc = run_cli("arle-runtime", "serve", str(tiny_bundle), "--no-verify", "--max-batched-tokens", "2",
                   timeout=60, env={"ARLE_THREADS": "1"})
    assert proc.returncode == 2
    assert_clean_error(proc, "at least the batch size (4)")


# --- serve --http-processes N: several HTTP processes, one engine process ------------------


def test_several_http_processes_give_the_same_answers_and_one_set_of_metrics(tiny_bundle, tmp_path, client, model):
    """Requests on separate connections (the kernel hands each to one of the HTTP
    processes) get the answers the one-process server gives; /metrics, whichever process
    answers it, counts every request; SIGTERM stops them all cleanly."""
    expected = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    srv = Server(tiny_bundle, tmp_path / "server.log", "--http-processes", "2")
    try:
        srv.wait_ready()

        def ask(_):
            with httpx.Client(timeout=TIMEOUT) as own_connection:
                return own_connection.post(srv.url + "/v1/chat/completions", json={
                    "model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}).json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
        assert {a["choices"][0]["message"]["content"] for a in answers} == {expected.choices[0].message.content}
        for _ in range(4):  # every scrape, whichever process answers it, sees all 16
            text = _metrics(srv)
            assert _metric(text, 'arle_requests_total{endpoint="/v1/chat/completions",status="200"}') == 16
            assert _metric(text, "arle_completion_tokens_total") == sum(a["usage"]["completion_tokens"] for a in answers)
            assert _metric(text, "arle_kv_pages_total") > 0
    finally:
        code = srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert log.count("Application shutdown complete") == 2


def _count_completion_tokens(n: int) -> None:  # an HTTP process's share (spawned, multiprocess mode)
    from arle_runtime.server import Metrics

    Metrics().completion_tokens.inc(n)


def _scrape() -> str:
    from arle_runtime.server import Metrics

    return Metrics().render({"kv_pages_total": 7, "prefix_hit_tokens": 3, "prefix_lookup_tokens": 12}).decode()


def test_metrics_of_several_processes_add_up(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    for n in (3, 4):
        proc = ctx.Process(target=_count_completion_tokens, args=(n,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
    with ctx.Pool(1) as pool:
        text = pool.apply(_scrape)
    assert _metric(text, "arle_completion_tokens_total") == 7
    assert _metric(text, "arle_kv_pages_total") == 7
    assert _metric(text, "arle_prefix_cache_hit_tokens_total") == 3
    assert _metric(text, "arle_prefix_cache_hit_rate") == 0.25


def test_bad_http_processes_are_one_line_errors(tiny_bundle):
    from conftest import assert_clean_error, run_cli

    port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        for args, says in ((["--http-processes", "0"], "at least 1"),
                           (["--http-processes", "2", "--one-process"], "drop --one-process"),
                           (["--http-processes", "2", "--port", str(port)], f"could not start on 127.0.0.1:{port}")):
            proc = run_cli("arle-runtime", "serve", str(tiny_bundle), "--no-verify", *args, timeout=60,
                           env={"ARLE_THREADS": "1"})
            assert proc.returncode == 2, proc.stderr
            assert_clean_error(proc, says)


# --- the default SmolLM2 bundle: long answers (for mid-stream events) and a real tools prompt -----


@pytest.fixture(scope="module")
def smol_server(default_bundle, tmp_path_factory):
    yield from running_server(default_bundle, tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="module")
def smol_model(default_bundle) -> str:
    return bundle_model_name(default_bundle)


def _well_formed_tool_calls(tool_calls) -> None:
    for call in tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name
        assert isinstance(json.loads(call.function.arguments), dict)


def test_tools_request_is_answered_in_shape(smol_server, smol_model):
    client = openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    resp = client.chat.completions.create(model=smol_model, messages=messages, tools=[WEATHER, TIME],
                                          tool_choice="auto", max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length", "tool_calls")
    assert resp.usage.prompt_tokens > 100  # the tools section is in the prompt
    _well_formed_tool_calls(choice.message.tool_calls)
    assert "<tool_call>" not in (choice.message.content or "") or not choice.message.tool_calls

    # A conversation that already called the tool and got its result, streamed.
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    chunks = list(client.chat.completions.create(model=smol_model, messages=history, tools=[WEATHER],
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert all(c.choices[0].delta.content is None or "<tool_call>" not in c.choices[0].delta.content for c in chunks)


def _stream_lines(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        return [line for line in r.iter_lines() if line]


def _has_token(line: str) -> bool:
    return '"content": "' in line and '"content": ""' not in line


def test_client_disconnect_cancels_and_frees_pages(smol_server, smol_model):
    idle = _metrics(smol_server)
    assert _metric(idle, "arle_kv_pages_in_use") == 0
    story = [{"role": "user", "content": "Tell me a very long story."}]
    body = {"model": smol_model, "messages": story, "max_tokens": 400, "temperature": 0, "stream": True}
    # Two streams share the batch with the one that goes away: its abort lands while their
    # forward pass runs, and must not end them (it once failed the whole batch).
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(_stream_lines, smol_server.url, {**body, "max_tokens": 30}) for _ in range(2)]
        with httpx.stream("POST", smol_server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()  # kept referenced: dropping the iterator early closes the connection
            for line in lines:
                if _has_token(line):
                    break
            assert _metric(_metrics(smol_server), "arle_kv_pages_in_use") > 0
        # leaving the block closes the connection mid-stream
        for other in others:
            last = [json.loads(x[6:]) for x in other.result(TIMEOUT) if x.startswith("data: {")][-1]
            assert last["choices"][0]["finish_reason"] == "length", last

    def cancelled_and_freed():
        now = _metrics(smol_server)
        return (_metric(now, "arle_kv_pages_in_use") == 0
                and _metric(now, "arle_requests_cancelled_total") == _metric(idle, "arle_requests_cancelled_total") + 1)

    _wait_for(cancelled_and_freed, 10, "cancel on disconnect")
    generated = _metric(_metrics(smol_server), "arle_completion_tokens_total") - \
        _metric(idle, "arle_completion_tokens_total")
    assert generated < 2 * 30 + 400


def test_sigterm_during_a_stream_ends_it_and_exits_zero(default_bundle, smol_model, tmp_path):
    srv = Server(default_bundle, tmp_path / "server.log")
    srv.wait_ready()
    body = {"model": smol_model, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    streaming, seen = threading.Event(), {"lines": [], "error": None}

    def consume():
        try:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    seen["lines"].append(line)
                    if _has_token(line):
                        streaming.set()
        except httpx.HTTPError as e:  # the connection may close before the stream's last lines
            seen["error"] = e
        finally:
            streaming.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        assert streaming.wait(TIMEOUT), "no token arrived"
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(10)
        elapsed = time.monotonic() - start
        reader.join(10)
        assert not reader.is_alive(), "the client is still waiting on the stream"
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within 10 s after SIGTERM:\n{srv.log.read_text()[-3000:]}") from None
    finally:
        srv.stop()
    assert rc == 0, srv.log.read_text()[-3000:]
    assert elapsed < 8
    ended = seen["error"] is not None or "data: [DONE]" in seen["lines"]
    assert ended, seen["lines"][-3:]
    finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in seen["lines"]
              if x.startswith("data: {") and '"finish_reason": "' in x]
    assert finish in ([], ["abort"]), finish


# --- tool_calls answers through the real app over a scripted engine -------------------------------


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class _ScriptedStream:
    """Stands in for a RequestStream: the reply, a few characters per output, then the final."""

    def __init__(self, request_id: int, reply: str, prompt_tokens: int):
        self.request_id, self.reply, self.prompt_tokens = request_id, reply, prompt_tokens

    def backlog(self) -> int:
        return 0

    async def __aiter__(self):
        from arle_runtime.engine.llm_engine import Completion, RequestOutput

        pieces = [self.reply[i:i + 3] for i in range(0, len(self.reply), 3)]
        for k, piece in enumerate(pieces):
            await asyncio.sleep(0)
            yield RequestOutput(self.request_id, k, piece)
        result = Completion(text=self.reply, token_ids=list(range(len(pieces))), prompt_tokens=self.prompt_tokens,
                            finish_reason="stop", ttft_s=0.0, total_s=0.0, request_id=self.request_id)
        yield RequestOutput(self.request_id, None, "", True, "stop", result=result)


class _ScriptedSession:
    """What create_app needs of a Session, answering every request with `reply` and keeping
    the rendered prompts; the chat template is SmolLM2's (it does not know tools)."""

    def __init__(self):
        from arle_runtime.chat import ChatTemplate

        self.bundle = SimpleNamespace(name="scripted")
        self.limits = SimpleNamespace(max_context=4096)
        self.template = ChatTemplate(SMOLLM2_TEMPLATE, None, None)
        self.reply, self.prompts = "", []
        self._ids = itertools.count()

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages, tools=None) -> list[int]:
        self.prompts.append(self.template.render(messages, tools=tools))
        return self.encode(self.prompts[-1])

    def background(self):
        session = self

        async def submit_async(ids, params):
            return _ScriptedStream(next(session._ids), session.reply, len(ids))

        async def stats_async():
            return {}

        return SimpleNamespace(alive=True, submit_async=submit_async, stats_async=stats_async, cancel=lambda rid: False)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted():
    from starlette.testclient import TestClient

    from arle_runtime.server import create_app

    session = _ScriptedSession()
    with TestClient(create_app(session)) as http:
        _wait_for(lambda: http.get("/readyz").status_code == 200, 10, "scripted app ready")
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        yield session, client


CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris, and the time?"}]


def test_tool_call_answer(scripted):
    session, client = scripted
    session.reply = "Let me check.\n" + CALL_PARIS
    resp = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    system = session.prompts[-1].split("<|im_end|>")[0]
    assert "<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(TIME) + "\n</tools>" in system


def test_tool_calls_stream_as_deltas_without_raw_tags(scripted):
    session, client = scripted
    session.reply = CALL_PARIS + "\n" + CALL_TIME
    chunks = list(client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert content == ""
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]
    assert all(d.id.startswith("call_") and d.type == "function" for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_parallel_tool_calls_false_keeps_the_first(scripted):
    session, client = scripted
    session.reply = CALL_PARIS + CALL_TIME
    resp = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME],
                                          parallel_tool_calls=False)
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_choice_none_hides_tools_and_keeps_text(scripted):
    session, client = scripted
    session.reply = CALL_PARIS
    resp = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].message.content == CALL_PARIS
    assert resp.choices[0].finish_reason == "stop" and "<tools>" not in session.prompts[-1]


def test_named_tool_choice_shows_only_that_tool(scripted):
    session, client = scripted
    session.reply = CALL_TIME
    resp = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER, TIME],
                                          tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert resp.choices[0].message.tool_calls[0].function.name == "get_time"
    assert "get_time" in session.prompts[-1] and "get_weather" not in session.prompts[-1].split("<|im_end|>")[0]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert e.value.body["param"] == "tool_choice"


def test_tool_results_in_history_are_rendered(scripted):
    session, client = scripted
    session.reply = "It is sunny in Paris."
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = client.chat.completions.create(model="scripted", messages=history, tools=[WEATHER])
    assert resp.choices[0].message.content == "It is sunny in Paris." and resp.choices[0].finish_reason == "stop"
    prompt = session.prompts[-1]
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in prompt


def test_a_dead_engine_process_makes_the_server_answer_503(tiny_bundle, tmp_path, model):
    srv = Server(tiny_bundle, tmp_path / "server.log")
    try:
        srv.wait_ready()
        children = [int(pid) for task in Path(f"/proc/{srv.proc.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        engine = [pid for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(engine) == 1, children
        os.kill(engine[0], signal.SIGKILL)
        _wait_for(lambda: httpx.get(srv.url + "/readyz", timeout=TIMEOUT).status_code == 503, 10, "readyz 503")
        assert httpx.get(srv.url + "/readyz", timeout=TIMEOUT).json()["status"] == "engine stopped"
        r = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2},
                       timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
        assert srv.proc.poll() is None  # the HTTP process stays up and says why
    finally:
        srv.stop()


def test_events_that_piled_up_go_out_in_one_write_and_none_waits_for_a_later_output():
    from arle_runtime.server import _coalesce

    class Backlogged:  # outputs 0-2 arrive together, 3 alone, then the [DONE] event
        def __init__(self):
            self.left = [2, 1, 0, 0, 0]

        def backlog(self):
            return self.left.pop(0)

    async def events():
        for i in range(4):
            yield f"data: {i}\n\n"
        yield "data: [DONE]\n\n"

    async def writes():
        return [w async for w in _coalesce(events(), Backlogged())]

    assert asyncio.run(writes()) == ["data: 0\n\ndata: 1\n\ndata: 2\n\n", "data: 3\n\n", "data: [DONE]\n\n"]

    closed = []

    async def endless():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            closed.append(True)  # where the request's stream would be cancelled

    async def leave_after_one():
        writer = _coalesce(endless(), SimpleNamespace(backlog=lambda: 0))
        await anext(writer)
        await writer.aclose()
        assert closed == [True]  # at once, not when the loop collects the generator later

    asyncio.run(leave_after_one())


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("usage", [True, False])
def test_a_text_chunk_is_what_json_dumps_of_its_whole_body_gives(kind, usage):
    from arle_runtime.server import _Chunks, _Job

    job = _Job(kind, 'cmpl-"1"', 1765000000, "m\u00e9/x", [1], None, True, usage, 0.0)
    chunks = _Chunks(job)
    for text in ["Paris", 'say "hi"\n\tback\\slash', "caf\u00e9 \u2603 \U0001f600", "</tool_call>"]:
        content = {"delta": {"content": text}} if kind == "chat" else {"text": text}
        body = {"id": job.id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": job.created, "model": job.model,
                "choices": [{"index": 0, **content, "logprobs": None, "finish_reason": None}],
                **({"usage": None} if usage else {})}
        assert chunks.text(text) == f"data: {json.dumps(body)}\n\n"
        assert chunks.event(body["choices"][0]) == chunks.text(text)
