"""`agent --url`: against a scripted OpenAI-compatible server (the model's tool call runs in
the real sandbox and its result goes back), and against `arle-runtime serve` itself."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, default_sigint

pexpect = pytest.importorskip("pexpect")
PROMPT = ">>> "
ARLE = str(Path(sys.executable).parent / "arle-runtime")


class ScriptedOpenAI(BaseHTTPRequestHandler):
    """Turn 1: call python; turn 2: answer with what the tool printed."""

    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send("application/json", json.dumps({"object": "list", "data": [{"id": "scripted-model"}]}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        tool = [m for m in body["messages"] if m["role"] == "tool"]
        code = "import time; time.sleep(60)" if "sleep" in body["messages"][-1]["content"] else "print(6 * 7)"
        if not tool or body["messages"][-1]["role"] == "user":
            call = {"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "python", "arguments": json.dumps({"code": code})}}
            events = [{"delta": {"content": "Let me compute that."}}, {"delta": {"tool_calls": [call]}},
                      {"delta": {}, "finish_reason": "tool_calls"}]
        else:
            events = [{"delta": {"content": f"The tool printed {tool[-1]['content']}."}},
                      {"delta": {}, "finish_reason": "stop"}]
        self._send("text/event-stream", "".join(f"data: {json.dumps({'choices': [e]})}\n\n" for e in events)
                   + "data: [DONE]\n\n")

    def _send(self, kind, text):
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def spawn_agent(*args, home):
    env = {**os.environ, "HOME": str(home), "TERM": "dumb", "ARLE_THREADS": os.environ.get("ARLE_THREADS", "1")}
    child = pexpect.spawn(ARLE, ["agent", *args], env=env, cwd=str(REPO), encoding="utf-8", timeout=60,
                          dimensions=(50, 250), preexec_fn=default_sigint)
    child.expect_exact(PROMPT)
    return child


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (Debian package `bubblewrap`) is not installed")
def test_tool_call_from_a_server_runs_sandboxed_and_feeds_back(tmp_path):
    ScriptedOpenAI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        child = spawn_agent("--url", f"http://127.0.0.1:{server.server_port}", home=tmp_path)
        assert "scripted-model at http://127.0.0.1" in child.before
        child.sendline("What is 6 * 7?")
        child.expect_exact("[python] print(6 * 7)")
        child.expect_exact("[python -> exit 0] 42")
        child.expect_exact("The tool printed 42.")
        child.expect_exact(PROMPT)
        child.sendline("Now sleep.")
        child.expect_exact("[python] import time; time.sleep(60)")
        start = time.monotonic()
        child.sendintr()  # Ctrl-C during the tool: the sandbox is killed, the REPL stays
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)
        assert time.monotonic() - start < 5
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        server.shutdown()
    first, second = ScriptedOpenAI.requests[:2]
    assert [t["function"]["name"] for t in first["tools"]] == ["python", "shell"] and first["stream"] is True
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "42"}
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_agent_talks_to_arle_serve(default_bundle, tmp_path):
    import httpx

    port = _free_port()
    env = {**os.environ, "ARLE_THREADS": os.environ.get("ARLE_THREADS", "1")}
    server = subprocess.Popen([ARLE, "serve", str(default_bundle), "--no-verify", "--port", str(port),
                               "--api-key", "sekrit"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.5)
        child = spawn_agent("--url", f"http://127.0.0.1:{port}", "--api-key", "sekrit", "--no-tools",
                            "--max-tokens", "40", home=tmp_path)
        child.sendline("What is the capital of France?")
        child.expect_exact("What is the capital of France?\r\n")
        child.expect_exact(PROMPT)
        assert "Paris" in child.before
        child.sendline("/stats")
        child.expect_exact("1 turns")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sigterm_at_the_prompt_exits_and_removes_the_work_dir(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        child = spawn_agent("--url", f"http://127.0.0.1:{server.server_port}", home=tmp_path)
        banner = child.before
        workdir = Path(banner.split("work dir ")[1].split()[0]) if "work dir " in banner else None
        child.kill(15)
        child.expect(pexpect.EOF)
        child.close()
    finally:
        server.shutdown()
    assert child.exitstatus == 128 + 15
    assert workdir is None or not workdir.exists()
