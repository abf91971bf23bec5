"""The agent's tools, in the OpenAI `tools` shape, and how a call becomes a sandbox run.

Calls come from a model, so every failure (unknown tool, arguments that are not the
JSON object the spec asks for) is a tool result the model can read, never an exception."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .sandbox import RunResult, Sandbox

TOOL_SPECS = [
    {"type": "function", "function": {
        "name": "python",
        "description": "Run a Python 3 program in a sandbox (no network; /work is the only writable folder) "
                       "and return what it prints. Use print() to see results.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The program."}},
                       "required": ["code"]}}},
    {"type": "function", "function": {
        "name": "shell",
        "description": "Run a POSIX shell command in the same sandbox and return its output.",
        "parameters": {"type": "object",
                       "properties": {"command": {"type": "string", "description": "The command line."}},
                       "required": ["command"]}}},
]
_ARGUMENT = {"python": "code", "shell": "command"}


@dataclass(frozen=True)
class ToolOutcome:
    name: str
    source: str  # the code or command, for showing to the user ("" when the call was malformed)
    result: RunResult | None  # None when nothing ran (a malformed call)
    text: str  # what the model gets back


def describe_tools() -> str:
    return "\n".join(f"  {t['function']['name']:7} {t['function']['description']}" for t in TOOL_SPECS)


def execute(name: str, arguments: str | dict, sandbox: Sandbox) -> ToolOutcome:
    """Run one call (arguments as OpenAI sends them: a JSON text, or an object)."""
    if name not in _ARGUMENT:
        return ToolOutcome(name, "", None, f"error: there is no tool '{name}'; the tools are python and shell.")
    key = _ARGUMENT[name]
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        args = None
    # Small models often send the program as a bare string: accept it rather than fail the turn.
    if isinstance(args, str):
        args = {key: args}
    if not isinstance(args, dict) or not isinstance(args.get(key), str):
        return ToolOutcome(name, "", None, f'error: {name} takes {{"{key}": "..."}} as its arguments.')
    source = args[key]
    result = sandbox.run_python(source) if name == "python" else sandbox.run_shell(source)
    return ToolOutcome(name, source, result, result.as_text(sandbox.limits))
