"""The interactive front end: line editing and history (stdlib readline, ~/.arle-history),
streamed answers, Ctrl-C stops the current answer (not the REPL), Ctrl-D or /quit exits,
and the slash commands below."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..errors import ArleError
from .loop import Agent
from .tools import ToolOutcome, describe_tools

HISTORY = "~/.arle-history"
PROMPT = ">>> "
STATS_SHOWN = 5  # /stats lists this many of the last turns

HELP = """Commands:
  /help            this list
  /reset, /clear   forget the conversation
  /tools           the tools and the sandbox
  /model           what answers
  /stats           tokens, tok/s and time to first token of the last turns
  /save PATH       save the conversation as JSON
  /load PATH       load a conversation saved with /save
  /export [PATH]   the conversation as Markdown (to PATH, or here)
  /quit, /exit     leave (Ctrl-D too)
Ctrl-C stops the current answer."""


def _history() -> None:
    try:
        import readline
    except ImportError:  # no readline (some builds): plain input() still works
        return
    path = Path(HISTORY).expanduser()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    import atexit

    def save():
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


class Repl:
    def __init__(self, agent: Agent, out=None):
        self.agent = agent
        self.out = out or sys.stdout

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def banner(self) -> str:
        return f"arle agent: {self.agent.backend.describe()}. /help lists commands; Ctrl-D or /quit leaves."

    def tools_line(self) -> str:
        if self.agent.tools:
            return f"tools: python, shell. {self.agent.sandbox.describe()}"
        if self.agent.sandbox is not None and not self.agent.sandbox.usable:
            return f"tools: off. {self.agent.sandbox.describe()}"
        return "tools: off (--no-tools)."

    def run(self) -> None:
        _history()
        self.say(self.banner())
        self.say(self.tools_line())
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.say()
                return
            except KeyboardInterrupt:  # like Python's REPL: drop the line, stay
                self.say()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                try:
                    if self.command(line) == "quit":
                        return
                except ArleError as e:
                    self.say(f"error: {e.message}")
                continue
            self.turn(line)

    # --- a turn ---------------------------------------------------------------------------

    def turn(self, text: str) -> None:
        def on_text(delta: str) -> None:
            self.out.write(delta)
            self.out.flush()

        def on_tool(kind: str, item) -> None:
            if kind == "call":
                fn = item["function"]
                self.say(f"\n[{fn['name']}] {_preview(fn['arguments'])}")
            elif isinstance(item, ToolOutcome):
                status = item.result.summary() if item.result else "bad arguments"
                self.say(f"[{item.name} -> {status}] {_first_lines(item.text)}")

        try:
            result = self.agent.ask(text, on_text, on_tool)
        except ArleError as e:
            self.say(f"\nerror: {e.message}")
            return
        if result.interrupted:
            self.say("\n[stopped]")
        elif result.max_turns_reached:
            self.say(f"\n[stopped after {result.turns} turns (--max-turns); the last calls were not run]")
        else:
            self.say()

    # --- slash commands -----------------------------------------------------------------------

    def command(self, line: str) -> str | None:
        try:
            parts = shlex.split(line)
        except ValueError as e:
            raise ArleError(f"Cannot parse that command line ({e}).") from None
        name, args = parts[0].lower(), parts[1:]
        if name in ("/quit", "/exit"):
            return "quit"
        handler = {
            "/help": self._help, "/reset": self._reset, "/clear": self._reset, "/tools": self._tools,
            "/model": self._model, "/stats": self._stats, "/save": self._save, "/load": self._load,
            "/export": self._export,
        }.get(name)
        if handler is None:
            raise ArleError(f"Unknown command {name}; /help lists the commands.")
        handler(args)
        return None

    @staticmethod
    def _arity(name: str, args: list[str], low: int, high: int, usage: str) -> None:
        if not low <= len(args) <= high:
            raise ArleError(f"Usage: {name} {usage}".rstrip() + ".")

    def _help(self, args):
        self.say(HELP)

    def _reset(self, args):
        self._arity("/reset", args, 0, 0, "")
        self.agent.reset()
        self.agent.stats.clear()
        self.say("Conversation cleared.")

    def _tools(self, args):
        self._arity("/tools", args, 0, 0, "")
        self.say(self.tools_line())
        if self.agent.tools:
            self.say(describe_tools())
            self.say(f"At most {self.agent.max_turns} model turns per message.")

    def _model(self, args):
        self._arity("/model", args, 0, 0, "")
        p = self.agent.params
        self.say(f"{self.agent.backend.describe()}; max_tokens {p.max_tokens}, temperature {p.temperature:g}")

    def _stats(self, args):
        self._arity("/stats", args, 0, 0, "")
        stats = self.agent.stats[-STATS_SHOWN:]
        if not stats:
            self.say("No turns yet.")
            return
        self.say(f"{'turn':>4} {'prompt':>7} {'output':>7} {'tok/s':>7} {'TTFT ms':>8} {'total s':>8}")
        first = len(self.agent.stats) - len(stats) + 1
        for i, s in enumerate(stats, first):
            self.say(f"{i:>4} {s.prompt_tokens:>7} {s.completion_tokens:>7} {s.tok_s:>7.1f} "
                     f"{s.ttft_s * 1000:>8.0f} {s.total_s:>8.2f}")
        total = sum(s.completion_tokens for s in self.agent.stats)
        self.say(f"{len(self.agent.stats)} turns, {total} tokens generated in all.")

    def _save(self, args):
        self._arity("/save", args, 1, 1, "PATH")
        try:
            self.agent.save(args[0])
        except OSError as e:
            raise ArleError(f"Cannot write {args[0]} ({e.strerror or e}).") from None
        self.say(f"Saved {len(self.agent.messages)} messages to {args[0]}.")

    def _load(self, args):
        self._arity("/load", args, 1, 1, "PATH")
        self.agent.load(args[0])
        self.say(f"Loaded {len(self.agent.messages)} messages from {args[0]}.")

    def _export(self, args):
        self._arity("/export", args, 0, 1, "[PATH]")
        text = self.agent.to_markdown()
        if not args:
            self.say(text.rstrip())
            return
        try:
            Path(args[0]).expanduser().write_text(text)
        except OSError as e:
            raise ArleError(f"Cannot write {args[0]} ({e.strerror or e}).") from None
        self.say(f"Wrote the transcript to {args[0]}.")


def _preview(arguments, width: int = 200) -> str:
    """A call's code or command on one line, for the user to see what runs."""
    import json

    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        args = arguments
    if isinstance(args, dict):
        args = args.get("code", args.get("command", args))
    text = args if isinstance(args, str) else json.dumps(args)
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[:width] + "..."


def _first_lines(text: str, lines: int = 6) -> str:
    shown = text.splitlines()
    more = f"\n  ... ({len(shown) - lines} more lines)" if len(shown) > lines else ""
    return ("\n  " if len(shown) > 1 else "") + "\n  ".join(shown[:lines]) + more
