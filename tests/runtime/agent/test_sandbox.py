"""Try to break out of the tool sandbox: each attempt must be contained, with a clear message."""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest

from arle_runtime.agent import sandbox as sandbox_mod
from arle_runtime.agent.sandbox import Limits, Sandbox

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("prlimit") is None,
                                 reason="bubblewrap (Debian package `bubblewrap`) or prlimit is not installed")
LIMITS = Limits(wall_s=3.0, memory_bytes=256 << 20, processes=32, output_bytes=8 << 10, file_bytes=1 << 20)


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(limits=LIMITS)
    yield box
    shutil.rmtree(box.workdir, ignore_errors=True)


@needs_bwrap
def test_bubblewrap_level_is_announced(sandbox):
    assert sandbox.level == "bubblewrap"
    line = sandbox.describe()
    assert line.startswith("sandbox: bubblewrap (no network, 256 MiB, 3 s, 32 processes, output cut at 8 KiB)")


@needs_bwrap
def test_python_and_shell_run_in_the_work_dir(sandbox):
    result = sandbox.run_python("import os; print(os.getcwd(), 6 * 7); open('made.txt', 'w').write('hi')")
    assert (result.exit_code, result.stdout.strip()) == (0, "/work 42")
    assert (sandbox.workdir / "made.txt").read_text() == "hi"
    shell = sandbox.run_shell("cat made.txt; echo oops >&2; exit 3")
    assert shell.stdout == "hi" and "oops" in shell.stderr and shell.exit_code == 3
    assert "[exit code 3]" in shell.as_text(LIMITS)


@needs_bwrap
def test_writes_outside_the_work_dir_fail(sandbox, tmp_path):
    outside = tmp_path / "outside.txt"
    host_tmp = Path(f"/tmp/arle-sandbox-test-{uuid.uuid4().hex}")
    result = sandbox.run_shell(f"echo pwned > /etc/arle-pwned; echo pwned > /usr/arle-pwned; "
                               f"echo pwned > {outside}; echo pwned > {host_tmp} && echo tmp-ok")
    assert "Read-only file system" in result.stderr
    assert not outside.exists() and not Path("/etc/arle-pwned").exists() and not Path("/usr/arle-pwned").exists()
    assert "tmp-ok" in result.stdout and not host_tmp.exists()  # /tmp is a private tmpfs, gone afterwards


@needs_bwrap
def test_network_is_unreachable(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    result = sandbox.run_python(
        "import socket\n"
        f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')\n"
        "except OSError as e:\n    print('refused:', e)\n"
        "try:\n    socket.getaddrinfo('example.com', 80); print('RESOLVED')\n"
        "except OSError as e:\n    print('no dns:', e)\n")
    server.setblocking(False)
    with pytest.raises(BlockingIOError):  # a connection would be waiting in the backlog
        server.accept()
    server.close()
    assert "CONNECTED" not in result.stdout and "refused:" in result.stdout, result.stdout + result.stderr
    assert "RESOLVED" not in result.stdout


@needs_bwrap
def test_fork_bomb_hits_the_process_limit(sandbox):
    start = time.monotonic()
    result = sandbox.run_python(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60)\n"
        "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('refused after', n, e.strerror)\n")
    assert "refused after" in result.stdout, result.stdout + result.stderr
    assert int(result.stdout.split()[2]) < LIMITS.processes
    assert time.monotonic() - start < LIMITS.wall_s + 2  # the sleepers died with the sandbox
    shell = sandbox.run_shell("f() { f | f & }; f; sleep 1")
    assert shell.seconds < LIMITS.wall_s + 2


@needs_bwrap
def test_gigabytes_of_output_are_cut(sandbox):
    result = sandbox.run_shell("head -c 3000000000 /dev/zero | tr '\\0' x")
    assert result.truncated and len(result.stdout) <= LIMITS.output_bytes
    assert result.summary() == "killed: output limit"
    assert "[output cut at 8 KiB; the process was stopped]" in result.as_text(LIMITS)
    assert result.seconds < LIMITS.wall_s


@needs_bwrap
def test_sleep_forever_is_killed_at_the_wall_clock_limit(sandbox):
    result = sandbox.run_shell("sleep 100000 & sleep 100000")
    assert result.timed_out and result.exit_code is None
    assert LIMITS.wall_s <= result.seconds < LIMITS.wall_s + 2
    assert "[killed after the 3 s wall-clock limit]" in result.as_text(LIMITS)


@needs_bwrap
def test_memory_and_file_size_limits(sandbox):
    memory = sandbox.run_python("x = bytearray(1 << 30); print('ALLOCATED')")
    assert "MemoryError" in memory.stderr and "ALLOCATED" not in memory.stdout
    big = sandbox.run_shell("head -c 5000000 /dev/zero > big.bin")
    assert "File size limit exceeded" in big.stderr or big.exit_code != 0
    assert (sandbox.workdir / "big.bin").stat().st_size <= LIMITS.file_bytes


def test_missing_bwrap_refuses_with_the_package_name(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox_mod.shutil, "which", lambda name: None)
    box = Sandbox(tmp_path / "work")
    assert box.level == "none" and not box.usable
    assert "Debian package `bubblewrap`" in box.describe()
    result = box.run_python("print(1)")
    assert result.refused and "--unsafe-tools" in result.as_text(box.limits)


def test_unsafe_level_says_so_loudly(tmp_path):
    box = Sandbox(tmp_path / "work", Limits(wall_s=1.0), unsafe=True)
    assert box.describe().startswith("WARNING: tools run UNSANDBOXED")
    result = box.run_shell("echo hi; sleep 100")
    assert result.stdout == "hi\n" and result.timed_out
