"""`arle-runtime serve`: the OpenAI-compatible server, run as a user would (a subprocess on a
loopback port) and driven with the official `openai` client and with raw httpx."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
            stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ),
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


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("server") / "server.log", "--api-key", KEY)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def model(tiny_bundle) -> str:
    return json.loads((tiny_bundle / "manifest.json").read_text()).get("name", tiny_bundle.name)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


def _post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    hdrs = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers=hdrs, timeout=TIMEOUT, **kw)
    return httpx.post(server.url + path, json=body, headers=hdrs, timeout=TIMEOUT, **kw)


MESSAGES = [{"role": "user", "content": "Say hi"}]


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


def test_concurrent_streams_match_alone(client, model):
    alone = _chat_stream_text(client, model)
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda _: _chat_stream_text(client, model), range(8), timeout=60))
    assert texts == [alone] * 8


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


def test_sigterm_exits_zero(tiny_bundle, tmp_path, model):
    srv = Server(tiny_bundle, tmp_path / "server.log")
    srv.wait_ready()
    ok = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT)
    assert ok.status_code == 200
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        srv.stop()
        raise AssertionError(f"no exit within 10 s after SIGTERM:\n{srv.log.read_text()[-3000:]}") from None
    srv.stop()
    assert rc == 0, srv.log.read_text()[-3000:]
    assert time.monotonic() - start < 10
