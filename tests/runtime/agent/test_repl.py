"""`arle-runtime agent` driven as a person would, in a terminal (pexpect), on the real default model."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_clean_error, default_sigint, run_cli

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.slow
PROMPT = ">>> "


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def repl(default_bundle, home):
    """One agent process for the tests below, in order (loading the bundle is the slow part)."""
    env = {**os.environ, "HOME": str(home), "TERM": "dumb", "ARLE_THREADS": os.environ.get("ARLE_THREADS", "1")}
    child = pexpect.spawn(str(Path(sys.executable).parent / "arle-runtime"),
                          ["agent", str(default_bundle), "--no-verify", "--max-tokens", "200"],
                          env=env, cwd=str(REPO), encoding="utf-8", timeout=90, dimensions=(50, 250),
                          preexec_fn=default_sigint)
    child.expect("tools: [^\r\n]*\r\n")
    child.banner = child.before + child.after
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def send(child, line: str) -> str:
    """Type a line, return what was printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")  # the terminal's echo
    child.expect_exact(PROMPT)
    return child.before


def test_startup_says_which_sandbox_is_in_force(repl):
    banner = repl.banner
    assert "arle agent: bundle default" in banner
    if shutil.which("bwrap"):
        assert "tools: python, shell. sandbox: bubblewrap (no network, 512 MiB, 10 s, 64 processes" in banner
    else:
        assert "tools: off" in banner and "bubblewrap" in banner


def test_slash_commands_answer_and_bad_ones_keep_the_repl(repl):
    assert "/export [PATH]" in send(repl, "/help")
    assert "bundle default" in send(repl, "/model")
    tools = send(repl, "/tools")
    assert "python" in tools and "shell" in tools
    assert send(repl, "/stats").strip() == "No turns yet."
    assert send(repl, "/frobnicate").strip() == "error: Unknown command /frobnicate; /help lists the commands."
    assert send(repl, "/save").strip() == "error: Usage: /save PATH."
    assert send(repl, "/load /nonexistent/chat.json").strip() == "error: No such file: /nonexistent/chat.json."


def test_a_real_answer_streams_and_stats_count_it(repl):
    assert "Paris" in send(repl, "What is the capital of France?")
    stats = send(repl, "/stats")
    assert "TTFT ms" in stats and "1 turns" in stats


def test_save_reset_load_round_trip(repl, tmp_path):
    path = tmp_path / "chat.json"
    assert f"Saved 2 messages to {path}." in send(repl, f"/save {path}")
    saved = json.loads(path.read_text())
    assert saved["version"] == 1 and saved["messages"][0]["content"] == "What is the capital of France?"
    assert "Conversation cleared." in send(repl, "/clear")
    assert "Loaded 2 messages" in send(repl, f"/load {path}")
    send(repl, f"/save {tmp_path / 'again.json'}")
    assert json.loads((tmp_path / "again.json").read_text()) == saved
    md = tmp_path / "chat.md"
    send(repl, f"/export {md}")
    assert md.read_text().startswith("# arle agent transcript") and "Paris" in md.read_text()


def test_ctrl_c_stops_the_answer_not_the_repl(repl):
    send(repl, "/reset")
    line = "Write a very long story about a dragon who learns to cook."
    repl.sendline(line)
    repl.expect_exact(line + "\r\n")
    repl.expect(r"\w+ \w+ \w+")  # the answer has started streaming
    repl.sendintr()
    repl.expect_exact("[stopped]")
    repl.expect_exact(PROMPT)
    assert repl.isalive()
    send(repl, "/reset")
    assert "Paris" in send(repl, "What is the capital of France?")  # the engine still answers


def test_ctrl_d_exits_and_keeps_history(repl, home):
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
    assert "What is the capital of France?" in (home / ".arle-history").read_text()


def test_agent_needs_a_bundle_or_url():
    assert_clean_error(run_cli("arle-runtime", "agent"), "exactly one of BUNDLE or --url")


def test_agent_url_that_does_not_answer_is_one_line():
    assert_clean_error(run_cli("arle-runtime", "agent", "--url", "http://127.0.0.1:9"), "Cannot reach")


def test_run_tools_without_bubblewrap_names_the_package(default_bundle):
    proc = run_cli("arle-runtime", "run", str(default_bundle), "--tools", "--prompt", "hi",
                   env={"PATH": str(Path(sys.executable).parent)})
    assert_clean_error(proc, "Debian package `bubblewrap`")
    assert proc.returncode == 2


def test_run_json_reports_turns_and_tool_calls(default_bundle):
    proc = run_cli("arle-runtime", "run", str(default_bundle), "--no-verify", "--prompt", "Say hi.", "--json",
                   "--max-tokens", "8")
    out = json.loads(proc.stdout)
    assert (out["turns"], out["tool_calls_executed"]) == (1, 0)
