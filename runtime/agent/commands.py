"""What `arle-runtime agent` and `arle-runtime run --tools` do once click has parsed the
options (runtime/cli.py keeps only the option declarations)."""

from __future__ import annotations

import json
import signal
import sys

import click

from ..errors import ArleError
from .loop import Agent, LocalBackend, RemoteBackend
from .sandbox import Limits, Sandbox


def check_tool_options(max_turns: int, tool_timeout: float = 10.0, tool_memory: int = 512) -> None:
    if max_turns < 1:
        raise ArleError(f"--max-turns must be at least 1, got {max_turns}.")
    if tool_timeout <= 0:
        raise ArleError(f"--tool-timeout must be positive, got {tool_timeout:g}.")
    if tool_memory < 64:
        raise ArleError(f"--tool-memory must be at least 64 (MiB), got {tool_memory}.")


def make_sandbox(workdir, unsafe: bool, tool_timeout: float = 10.0, tool_memory: int = 512) -> Sandbox:
    return Sandbox(workdir, Limits(wall_s=tool_timeout, memory_bytes=tool_memory << 20), unsafe=unsafe)


def run_agent(*, bundle, url, api_key, model, system, params, tools, unsafe_tools, max_turns, workdir, tool_timeout,
              tool_memory, engine_config, verify) -> None:
    """The REPL over a bundle or a server."""
    from .repl import Repl

    if (bundle is None) == (url is None):
        raise ArleError("Give exactly one of BUNDLE or --url URL.")
    if model and not url:
        raise ArleError("--model names a model on the server; it needs --url.")
    check_tool_options(max_turns, tool_timeout, tool_memory)
    sandbox = make_sandbox(workdir, unsafe_tools, tool_timeout, tool_memory) if tools else None
    session = None
    if url:
        backend = RemoteBackend(url, api_key, model)
    else:
        from ..session import Session

        session = Session.open(bundle, verify=verify, engine_config=engine_config)
        session.background()  # generation on its own thread, so Ctrl-C cancels a request cleanly
        backend = LocalBackend(session)
    # The REPL takes KeyboardInterrupt as "stop this answer", so SIGTERM (which the CLI turns
    # into one) and a closed terminal must end it another way, through the cleanup below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        Repl(Agent(backend, params, sandbox, tools, max_turns, system)).run()
    finally:
        if sandbox is not None:
            sandbox.close()
        if session is not None:
            session.close()


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def run_with_tools(session, messages: list[dict], params, *, as_json: bool, sandbox: Sandbox, max_turns: int) -> None:
    """`run --tools`: one question, the tool loop, the final answer on stdout (tool activity on stderr)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    agent = Agent(LocalBackend(session), params, sandbox, True, max_turns, system)
    click.echo(sandbox.describe(), err=True)

    def on_text(delta: str) -> None:
        if not as_json:
            sys.stdout.write(delta)
            sys.stdout.flush()

    def on_tool(kind: str, item) -> None:
        if kind == "call":
            click.echo(f"\n[{item['function']['name']}] {item['function']['arguments']}", err=True)
        else:
            status = item.result.summary() if item.result else "bad arguments"
            click.echo(f"[{item.name} -> {status}]\n{item.text}", err=True)

    try:
        result = agent.ask(messages[-1]["content"], on_text, on_tool)
    finally:
        sandbox.close()
    if result.max_turns_reached:
        click.echo(f"[stopped after {result.turns} turns (--max-turns)]", err=True)
    stats = agent.stats
    if as_json:
        click.echo(json.dumps({
            "text": result.text,
            "prompt_tokens": stats[-1].prompt_tokens,
            "completion_tokens": sum(s.completion_tokens for s in stats),
            "finish_reason": "tool_calls" if result.max_turns_reached else result.finish_reason,
            "ttft_ms": round(stats[0].ttft_s * 1000, 1),
            "decode_tok_s": round(stats[-1].tok_s, 1),
            "bundle": session.bundle.name,
            "tool_calls_executed": result.tool_calls_executed,
            "turns": result.turns,
            "messages": agent.messages,
        }))
    else:
        sys.stdout.write("\n")
