"""Run model-written code where it cannot hurt: bubblewrap namespaces plus rlimits.

Levels: "bubblewrap" (no network, read-only system, only the work dir writable, its
own PID namespace), "unsafe" (only the rlimits and the timeout; --unsafe-tools), or
"none" (bwrap missing: tools are refused with a sentence naming the Debian package).

Why the process limit is set inside the sandbox (by `prlimit`) and why we drop to
nobody when we are root: Linux counts RLIMIT_NPROC per user and exempts uid 0, so a
limit set on a root-owned bwrap never bites, and one set before the user namespace
exists would count every process the user runs on the host.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArleError

NOBODY = 65534
MISSING_BWRAP = ("bubblewrap (`bwrap`) is not installed, so tools cannot run sandboxed; install the Debian package "
                 "`bubblewrap` (apt-get install bubblewrap), or pass --unsafe-tools to run them without a sandbox, "
                 "or --no-tools.")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall-clock seconds; then the whole process tree is killed
    memory_bytes: int = 512 << 20  # RLIMIT_AS per process
    processes: int = 64  # RLIMIT_NPROC inside the sandbox
    output_bytes: int = 16 << 10  # stdout + stderr kept; more stops the process
    file_bytes: int = 64 << 20  # RLIMIT_FSIZE: largest file it may write
    code_bytes: int = 64 << 10  # largest program or command accepted


@dataclass(frozen=True)
class RunResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when we killed it
    timed_out: bool = False
    truncated: bool = False
    seconds: float = 0.0
    refused: str | None = None  # the sentence, when nothing ran

    def summary(self) -> str:
        """A short line for the user: how it ended."""
        if self.refused:
            return "refused"
        if self.timed_out:
            return "killed: wall-clock limit"
        if self.truncated:
            return "killed: output limit"
        return f"exit {self.exit_code}" + (f" (signal {-self.exit_code})" if (self.exit_code or 0) < 0 else "")

    def as_text(self, limits: Limits) -> str:
        """What the model sees as the tool result."""
        if self.refused:
            return f"error: {self.refused}"
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("[stderr]\n" + self.stderr.rstrip("\n"))
        if self.truncated:
            parts.append(f"[output cut at {limits.output_bytes // 1024} KiB; the process was stopped]")
        if self.timed_out:
            parts.append(f"[killed after the {limits.wall_s:g} s wall-clock limit]")
        elif self.exit_code:
            parts.append(f"[exit code {self.exit_code}]")
        return "\n".join(parts) if parts else "[no output]"


def _python() -> tuple[str, str | None]:
    """An interpreter the sandbox can see: the system one under /usr if there is one (it
    needs no extra bind), else ours, whose prefix is then bound read-only."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate, None
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return exe, sys.base_prefix


class Sandbox:
    def __init__(self, workdir: str | Path | None = None, limits: Limits = Limits(), unsafe: bool = False):
        self.limits = limits
        self.bwrap = shutil.which("bwrap")
        self.prlimit = shutil.which("prlimit")
        self.level = "unsafe" if unsafe else ("bubblewrap" if self.bwrap and self.prlimit else "none")
        self._owns_workdir = workdir is None  # a temporary one is removed by close()
        self._workdir = Path(workdir) if workdir else None
        self._as_nobody = self.level == "bubblewrap" and os.geteuid() == 0

    @property
    def workdir(self) -> Path:
        """Made on first use, so a command that fails before running a tool leaves nothing behind."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="arle-agent-"))
        if not self._workdir.is_dir():
            self._workdir.mkdir(parents=True)
        if self._as_nobody and self._workdir.stat().st_uid != NOBODY:
            os.chown(self._workdir, NOBODY, NOBODY)  # the sandboxed user must be able to write it
        return self._workdir

    @property
    def usable(self) -> bool:
        return self.level != "none"

    def describe(self) -> str:
        lim = self.limits
        sizes = (f"{lim.memory_bytes >> 20} MiB, {lim.wall_s:g} s, {lim.processes} processes, "
                 f"output cut at {lim.output_bytes >> 10} KiB")
        if self.level == "bubblewrap":
            return f"sandbox: bubblewrap (no network, {sizes}); work dir {self.workdir}"
        if self.level == "unsafe":
            return (f"WARNING: tools run UNSANDBOXED (--unsafe-tools): the model's code can read and write your "
                    f"files and use the network (limits only: {sizes}); work dir {self.workdir}")
        return f"sandbox: none. {MISSING_BWRAP}"

    def require(self) -> None:
        if not self.usable:
            raise ArleError(MISSING_BWRAP)

    def close(self) -> None:
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # --- running -------------------------------------------------------------------------

    def run_python(self, code: str) -> RunResult:
        exe, prefix = _python()
        return self._run([exe, "-I", "-c", code], code, prefix)

    def run_shell(self, command: str) -> RunResult:
        return self._run(["/bin/sh", "-c", command], command, None)

    def _run(self, argv: list[str], code: str, extra_ro: str | None) -> RunResult:
        if not self.usable:
            return RunResult("", "", None, refused=MISSING_BWRAP)
        if len(code.encode()) > self.limits.code_bytes:
            return RunResult("", "", None, refused=f"the code is longer than {self.limits.code_bytes >> 10} KiB.")
        if self.level != "bubblewrap":
            return self._spawn(argv)
        result = self._spawn(self._bwrap_argv(extra_ro) + [self.prlimit, f"--nproc={self.limits.processes}", "--",
                                                           *argv])
        if result.exit_code == 1 and result.stderr.startswith("bwrap: ") and not result.stdout:
            hint = " (as root, tools run as `nobody`: the work dir must be reachable by that user)" \
                if self._as_nobody else ""
            return RunResult("", "", None, refused=f"the sandbox could not start: {result.stderr.strip()}{hint}.")
        return result

    def _bwrap_argv(self, extra_ro: str | None) -> list[str]:
        argv = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = Path("/") / name
            if path.is_symlink():  # merged /usr: keep the symlink, the target is bound already
                argv += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                argv += ["--ro-bind", str(path), str(path)]
        argv += ["--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        if extra_ro and not extra_ro.startswith("/usr/"):
            argv += ["--ro-bind", extra_ro, extra_ro]
        argv += ["--bind", str(self.workdir), "/work", "--chdir", "/work", "--setenv", "HOME", "/work",
                 "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--unsetenv", "ARLE_API_KEY"]
        return argv

    def _limit(self) -> None:
        """In the child before exec (and inherited by the sandbox): per-process limits."""
        lim = self.limits
        cpu = int(lim.wall_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.level == "unsafe":  # no prlimit wrapper here (and no effect for root)
            resource.setrlimit(resource.RLIMIT_NPROC, (lim.processes, lim.processes))

    def _spawn(self, argv: list[str]) -> RunResult:
        lim = self.limits
        user = dict(user=NOBODY, group=NOBODY, extra_groups=[]) if self._as_nobody else {}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.workdir), "LANG": "C.UTF-8"}
        start = time.monotonic()
        # A Ctrl-C that lands inside fork() is raised in an at-fork callback, which swallows
        # it (the tool then ran on to its timeout): note it here and raise it once `proc` exists.
        interrupted: list[int] = []
        swap = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) if swap else None
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=self.workdir, env=env, start_new_session=True, preexec_fn=self._limit,
                                    **user)
        finally:
            if swap:
                signal.signal(signal.SIGINT, previous)
        budget = [lim.output_bytes]
        lock = threading.Lock()
        over = threading.Event()
        chunks: dict[str, list[bytes]] = {"out": [], "err": []}

        def drain(stream, key):
            while True:
                data = stream.read1(65536)
                if not data:
                    return
                with lock:
                    keep = data[: budget[0]]
                    budget[0] -= len(keep)
                    chunks[key].append(keep)
                    if len(keep) < len(data):
                        over.set()
                        _kill(proc)  # gigabytes of output: stop it rather than read them all

        readers = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
        for t in readers:
            t.start()
        timed_out = False
        try:
            if interrupted:
                raise KeyboardInterrupt
            proc.wait(timeout=lim.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = not over.is_set()
            _kill(proc)
            proc.wait()
        finally:  # Ctrl-C or any error: never leave the tree running
            _kill(proc)
        for t in readers:
            t.join(timeout=2)
        text = {k: b"".join(v).decode("utf-8", "replace") for k, v in chunks.items()}
        code = proc.returncode
        killed = timed_out or over.is_set()
        return RunResult(text["out"], text["err"], None if killed else code, timed_out, over.is_set(),
                         time.monotonic() - start)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group; under bubblewrap that ends its PID namespace, so every
    process the code started dies with it (--die-with-parent)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
