"""Every command in the docs (docs/**/*.md, README.md, baselines/README.md) is checked here.

The convention, by the fence's tag:
  ```bash / ```sh / ```shell   commands. Each is parsed (the program exists; for `arlec` and
                               `arle-runtime` the subcommand and every option parse with click)
                               and then run if RUN lists it; NOT_RUN says why the others are
                               not (pytest reports them as skipped with that reason), and a
                               subcommand in neither fails the test.
  ```console                   a transcript: the lines starting with `$ ` are commands, as above.
  anything else (```text, untagged)
                               synopses and output, not run; but every line that starts with
                               `arlec`/`arle-runtime` (or `$ ` and one of them) must name real
                               subcommands and only real --options, and every
                               `python benchmarks/*.py` line only options its --help lists.
A program this file does not know fails the test: run it here, or tag the block `text`.

Bundle paths and model names in the docs are replaced with this session's bundles
(tests/conftest.py, per KNOWN_BUNDLES; commands on other bundle paths are parsed only);
`arle-runtime run` gets `--max-tokens 8`, `serve` a free port (it is started, must answer
/readyz, and must exit 0 on SIGTERM); curl commands go to one live server on the default
bundle, with `max_tokens` capped at 8.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from conftest import REPO

DOCS = sorted({*REPO.glob("docs/**/*.md"), REPO / "README.md", REPO / "baselines" / "README.md"})
RUN_TAGS = {"bash", "sh", "shell"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
DEFAULT_BUNDLE = "build/smollm2-135m-instruct-int8-cpu.arle"
DEFAULT_MODEL = "smollm2-135m-instruct-int8-cpu"
# Bundle paths in the docs -> the tests/conftest.py fixture that stands in for them.
KNOWN_BUNDLES = {DEFAULT_BUNDLE: "default_bundle", "build/my.arle": "tiny_bundle"}
DOC_URL = "http://127.0.0.1:8000"
SERVER_READY_S = 120

# Subcommands run for real: quick, and they exit by themselves (serve is stopped after /readyz).
RUN = {("arlec", "inspect"), ("arlec", "verify"), ("arlec", "doctor"), ("arle-runtime", "run"),
       ("arle-runtime", "serve")}
# (program, subcommand) -> why it is parsed but not run here (and where it is exercised).
NOT_RUN = {
    ("arlec", "build"): "compiles for minutes; tests/conftest.py builds the default and fp32 bundles the same way",
    ("arlec", "bench"): "about 30 s a run; tests/arlec/test_bench.py runs it short",
    ("arlec", "regress"): "about 30 s a run; tests/arlec/test_regress_ci.py runs CI's regress command",
    ("arlec", "package"): "copies the bundle and builds a wheel; tests/arlec/test_package.py serves a context",
    ("arle-runtime", "agent"): "interactive; tests/runtime/agent/test_repl.py drives it",
    ("arle-runtime", "serve-ray"): "starts a Ray cluster; tests/runtime/test_ray_serve.py runs it",
    ("arle-runtime", "train"): "trains for minutes; tests/runtime/train/ runs each mode small",
    ("arle-runtime", "data"): "needs the doc's input file; tests/runtime/train/ converts every format",
    ("python", "benchmarks"): "a benchmark runs for minutes; its options are checked against its --help",
    ("python", "venv"): "creates a virtual environment; .ci/run does exactly this",
    ("python", "pytest"): "the test suite itself; .ci/run runs it",
    ("pip", "install"): "installs from the network; .ci/run runs the README's install line",
    ("docker", ""): "no Docker engine here; tests/arlec/test_package.py installs the image's requirements in a venv",
    ("shell", ""): "activates a virtual environment (shell state)",
}
NEEDS_GPU = "needs a GPU; CUDA builds are exercised on the lent H200 (docs/perf/cuda-h200.md)"


@dataclass(frozen=True)
class DocCommand:
    doc: str  # path relative to the repo
    line: int
    tag: str
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} {self.text[:60]}"


def extract(path: Path, root: Path = REPO) -> list[DocCommand]:
    """The commands of one Markdown file: (tagged run-blocks) and synopsis lines (others)."""
    out, tag, fence, pending, start = [], None, None, "", 0
    rel = str(path.relative_to(root))
    for no, line in enumerate(path.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, tag = m.group(1), (m.group(2) or "").lower()
            continue
        if line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            fence, tag = None, None
            continue
        text = line.strip()
        if tag in RUN_TAGS or tag == "console":
            if pending:
                pending, text = pending + " " + text, pending + " " + text
            elif tag == "console":
                if not text.startswith("$ "):
                    continue
                text, start = text[2:], no
            else:
                if not text or text.startswith("#"):
                    continue
                start = no
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            pending = ""
            out.append(DocCommand(rel, start, "run", text))
        else:
            bare = text[2:] if text.startswith("$ ") else text
            if re.match(r"(arlec|arle-runtime)(\s|$)|python3? benchmarks/", bare):
                out.append(DocCommand(rel, no, "synopsis", bare))
    return out


ALL = [c for doc in DOCS for c in extract(doc)]


# --- parsing ----------------------------------------------------------------------------

def roots() -> dict[str, click.Group]:
    from arle_runtime.cli import cli as runtime_cli

    from arlec.cli import cli as arlec_cli

    return {"arlec": arlec_cli, "arle-runtime": runtime_cli}


def parse_cli(argv: list[str]) -> list[str]:
    """Parse argv with click exactly as the program would, without running it; returns the
    command path. Raises click.UsageError for an unknown subcommand or option."""
    cmd, parent, path, args = roots()[argv[0]], None, [argv[0]], argv[1:]
    while True:
        try:
            ctx = cmd.make_context(path[-1], list(args), parent=parent)
        except click.exceptions.Exit:  # --help or --version: parsed, and would print and exit 0
            return path
        if not isinstance(cmd, click.Group):
            return path
        rest = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]
        if not rest:
            return path
        name, cmd, args = cmd.resolve_command(ctx, rest)
        path, parent = [*path, name], ctx


def split_commands(text: str) -> list[tuple[dict, list[str], str | None]]:
    """A shell line as simple commands: (env, argv, stdin file). Handles &&, ||, ;, |,
    `for V in a b; do ...; done` (V takes its first value), VAR=x prefixes and < / > redirects."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    commands, current, vars_ = [], [], {}
    for tok in [*lex, ";"]:
        if tok in (";", "&&", "||", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(tok)
    out = []
    for argv in commands:
        if argv[0] == "for" and len(argv) >= 4 and argv[2] == "in":
            vars_[argv[1]] = argv[3]
            continue
        if argv[0] == "done":
            continue
        if argv[0] == "do":
            argv = argv[1:]
        argv = [re.sub(r"\$(\w+)", lambda m: vars_.get(m.group(1), m.group(0)), a) for a in argv]
        env = {}
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
            k, _, v = argv.pop(0).partition("=")
            env[k] = v
        stdin = None
        for redirect in ("<", ">", "2>"):
            while redirect in argv:
                i = argv.index(redirect)
                if redirect == "<":
                    stdin = argv[i + 1]
                del argv[i:i + 2]
        if argv:
            out.append((env, argv, stdin))
    return out


def kind(argv: list[str]) -> tuple[str, str]:
    if argv[0] in (".", "source"):
        return "shell", ""
    prog = Path(argv[0]).name
    if prog in ("arlec", "arle-runtime"):
        return prog, next((a for a in argv[1:] if not a.startswith("-")), "")
    if prog in ("python", "python3"):
        if argv[1:3] == ["-m", "venv"]:
            return "python", "venv"
        if argv[1:3] == ["-m", "pytest"]:
            return "python", "pytest"
        if len(argv) > 1 and argv[1].startswith("benchmarks/"):
            return "python", "benchmarks"
    if prog in ("pip", "pip3") and argv[1:2] == ["install"]:
        return "pip", "install"
    if prog in ("docker", "curl"):
        return prog, ""
    return prog, "?"


@functools.cache
def script_help(script: str) -> str:
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def check_script_options(argv: list[str]) -> None:
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
    text = script_help(argv[1])
    for opt in {a.split("=")[0] for a in argv[2:] if a.startswith("--")}:
        assert re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", text), f"{argv[1]} has no option {opt}"


def check_pip(argv: list[str]) -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in argv[2:]:
        m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if m:
            missing = set(m.group(1).split(",")) - set(extras)
            assert not missing, f"pyproject.toml has no extra {missing}"


# --- the tests --------------------------------------------------------------------------

def test_the_docs_have_commands_to_check():
    docs = {c.doc for c in ALL}
    assert {"README.md", "docs/quickstart.md", "docs/http-api.md"} <= docs, docs


@pytest.mark.parametrize("cmd", [c for c in ALL if c.tag == "synopsis"], ids=str)
def test_synopsis_names_real_subcommands_and_options(cmd: DocCommand):
    line = re.split(r"\s#\s", cmd.text)[0]
    words = line.split()
    if words[0].startswith("python"):
        return check_script_options([words[0], words[1], *re.findall(r"--[a-z][\w-]*", line)])
    command = roots()[words[0]]
    path = [words[0]]
    for word in words[1:]:
        if not isinstance(command, click.Group):
            break
        names = command.list_commands(None)
        if word in names:
            command, path = command.get_command(None, word), [*path, word]
        elif "|" in word and all(w in names for w in word.split("|")):
            return  # `train sft|pretrain|...`: each alternative exists
        elif re.fullmatch(r"[a-z][\w-]*", word):
            pytest.fail(f"{cmd}: `{' '.join(path)}` has no subcommand {word!r} (it has {', '.join(names)})")
        else:
            break
    if isinstance(command, click.Group):
        return
    known = {o for p in command.params for o in [*p.opts, *p.secondary_opts]} | {"--help", "-h"}
    used = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", line))
    assert used <= known, f"{cmd}: `{' '.join(path)}` has no option {sorted(used - known)}"


def substitute(argv: list[str], request) -> list[str]:
    """Bundle paths of the docs -> this session's bundles (KNOWN_BUNDLES); fixtures are asked
    for only when needed (building is slow). Skips a command on a bundle the tests lack."""
    out = []
    for a in argv:
        if a.endswith(".arle") or a.endswith(".arle/"):
            fixture = KNOWN_BUNDLES.get(a.rstrip("/"))
            if fixture is None:
                pytest.skip(f"parsed, not run: {a} is none of the bundles the tests build ({', '.join(KNOWN_BUNDLES)})")
            a = str(request.getfixturevalue(fixture))
        out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return 0


def start_server(argv: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = Path(sys.executable).parent / argv[0]
    logf = open(log, "w")
    proc = subprocess.Popen([str(exe), *argv[1:], "--port", str(port)], stdout=logf, stderr=subprocess.STDOUT,
                            cwd=REPO, env={**os.environ, "ARLE_THREADS": "1", **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline and proc.poll() is None and _get(f"{url}/readyz") != 200:
        time.sleep(0.3)
    return proc, url


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@pytest.fixture(scope="module")
def live_server(default_bundle, tmp_path_factory):
    """One server on the default bundle for the docs' curl commands."""
    log = tmp_path_factory.mktemp("docs-server") / "server.log"
    proc, url = start_server(["arle-runtime", "serve", str(default_bundle), "--no-verify"], {}, log)
    try:
        assert _get(f"{url}/readyz") == 200, log.read_text()[-3000:]
        name = json.loads((default_bundle / "manifest.json").read_text())["name"]
        yield url, name
    finally:
        stop_server(proc)


def run_arle(argv, env, stdin, request, tmp_path) -> None:
    prog, sub = argv[0], parse_cli(argv)[1:2]
    argv = substitute(argv, request)
    if sub == ["serve"]:
        log = tmp_path / "serve.log"
        proc, url = start_server(argv, env, log)
        ready = _get(f"{url}/readyz")
        code = stop_server(proc)
        assert ready == 200, f"no /readyz: {log.read_text()[-3000:]}"
        assert code == 0, f"exit {code} on SIGTERM: {log.read_text()[-3000:]}"
        return
    if sub == ["run"]:
        argv = [*argv, "--max-tokens", "8"]  # the last one given wins
    stdin_text = None
    if stdin is not None:
        src = REPO / stdin
        stdin_text = src.read_text() if src.is_file() else "What is the capital of France?\n"
    exe = Path(sys.executable).parent / prog
    proc = subprocess.run([str(exe), *argv[1:]], input=stdin_text, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "ARLE_THREADS": "1", **env})
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr


def run_curl(argv, env, request) -> None:
    if shutil.which("curl") is None:
        pytest.skip("parsed, not run: curl is not installed (apt-get install curl)")
    url, name = request.getfixturevalue("live_server")
    argv = [a.replace(DOC_URL, url).replace("http://localhost:8000", url).replace(DEFAULT_MODEL, name)
            for a in argv]
    if any(a.startswith("-d") or a == "--data" for a in argv):
        argv = [*argv[:-1], _short(argv[-1])] if argv[-1].startswith("{") else argv
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ARLE_API_KEY": "sk-docs-test", **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no answer"
    assert '"error"' not in proc.stdout, proc.stdout[-2000:]


def _short(body: str) -> str:
    """A doc's request with max_tokens capped at 8, so examples answer in seconds."""
    data = json.loads(body)
    if "max_tokens" in data or "messages" in data or "prompt" in data:
        data["max_tokens"] = min(int(data.get("max_tokens", 8)), 8)
    return json.dumps(data)


@dataclass(frozen=True)
class Step:
    """One simple command of a doc's command line (`a && b` is two steps)."""

    cmd: DocCommand
    env: tuple = ()
    argv: tuple = ()
    stdin: str | None = None
    error: str | None = None

    def __str__(self) -> str:
        return f"{self.cmd.doc}:{self.cmd.line} {' '.join(self.argv)[:60] if self.argv else self.cmd.text[:60]}"


def steps(cmd: DocCommand) -> list[Step]:
    try:
        return [Step(cmd, tuple(env.items()), tuple(argv), stdin) for env, argv, stdin in split_commands(cmd.text)]
    except ValueError as e:
        return [Step(cmd, error=f"not a valid shell line ({e})")]


@pytest.mark.parametrize("step", [s for c in ALL if c.tag == "run" for s in steps(c)], ids=str)
def test_doc_command(step: Step, request, tmp_path):
    if step.error:
        pytest.fail(f"{step}: {step.error}")
    env, argv = dict(step.env), list(step.argv)
    prog, sub = kind(argv)
    if sub == "?":
        pytest.fail(f"{step}: `{argv[0]}` is not a command this test knows how to check; teach "
                    f"tests/test_docs_commands.py, or tag the block `text` if it is not meant to be run")
    if prog in ("arlec", "arle-runtime"):
        try:
            path = parse_cli(argv)
        except click.UsageError as e:
            pytest.fail(f"{step}: {e.format_message()}")
        if "--target" in argv and argv[argv.index("--target") + 1] == "cuda":
            pytest.skip(f"parsed, not run: {NEEDS_GPU}")
        key = (prog, path[1] if len(path) > 1 else "")
        if key in NOT_RUN:
            pytest.skip(f"parsed, not run: {' '.join(path)}: {NOT_RUN[key]}")
        if key not in RUN:
            pytest.fail(f"{step}: tests/test_docs_commands.py does not know how to exercise `{' '.join(path)}`; "
                        f"add it to RUN (quick, exits by itself) or to NOT_RUN (with the test that runs it)")
        run_arle(argv, env, step.stdin, request, tmp_path)
    elif prog == "curl":
        run_curl(argv, env, request)
    else:
        if (prog, sub) == ("python", "benchmarks"):
            check_script_options(argv)
        if prog == "pip":
            check_pip(argv)
        pytest.skip(f"parsed, not run: {' '.join(argv[:3])}: {NOT_RUN[(prog, sub)]}")


def test_the_convention_reads_tags_transcripts_continuations_and_loops(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```console\n$ arlec inspect a.arle \\\n    --json\n{output}\n```\n"
                   "```text\narlec verify B\n```\n```\nnot a command\n```\n"
                   "```bash\n# a comment\nfor q in int8 int4; do arlec build --quant $q; done\n```\n")
    found = [(c.line, c.tag, c.text) for c in extract(doc, root=tmp_path)]
    assert found == [(2, "run", "arlec inspect a.arle --json"), (7, "synopsis", "arlec verify B"),
                     (14, "run", "for q in int8 int4; do arlec build --quant $q; done")]
    assert [argv for _, argv, _ in split_commands(found[2][2])] == [["arlec", "build", "--quant", "int8"]]
    env, argv, stdin = split_commands("ARLE_THREADS=1 arle-runtime run b.arle --stdin < p.txt")[0]
    assert (env, argv, stdin) == ({"ARLE_THREADS": "1"}, ["arle-runtime", "run", "b.arle", "--stdin"], "p.txt")
    with pytest.raises(click.UsageError):
        parse_cli(["arle-runtime", "frobnicate"])
    with pytest.raises(click.UsageError):
        parse_cli(["arlec", "build", "--no-such-option"])


LINK = re.compile(r"\]\(([^)\s#]+)(#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_relative_links_point_at_files(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    missing = [t for t, _ in LINK.findall(text) if not re.match(r"\w+:", t) and not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


def test_ci_runs_the_readme_test_command():
    """The README's second command is what .ci/run runs, so it is exercised on every CI run."""
    readme = [c.text for c in ALL if c.doc == "README.md" and c.tag == "run"]
    ci = (REPO / ".ci" / "run").read_text()
    assert len(readme) >= 2 and readme[1] in ci, readme


def test_cli_reference_is_generated_from_the_current_commands():
    import difflib

    from arlec.clidoc import REGEN, render

    committed, fresh = (REPO / "docs" / "cli-reference.md").read_text(), render()
    diff = difflib.unified_diff(committed.splitlines(), fresh.splitlines(), "committed", "generated", lineterm="")
    assert committed == fresh, f"docs/cli-reference.md is stale; regenerate it with `{REGEN}`:\n" + "\n".join(
        list(diff)[:40])
