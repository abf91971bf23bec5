"""Start the process with the system's libstdc++ preloaded, before torch loads.

Seen on the CUDA image we serve from (torch 2.11, g++ 13.3): every AOTInductor package
crashes at load inside its own std::regex code, because an older libstdc++ pulled in by
a Python extension wins the symbol lookup; with LD_PRELOAD set to the distribution's
libstdc++ (the one `ldconfig -p` lists) the same packages load and run. A process cannot
change its own link order after start, so `arle-runtime` re-executes itself once with
that variable set. ARLE_NO_PRELOAD=1 turns this off.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache

MARKER = "ARLE_PRELOADED"


@lru_cache(maxsize=1)
def system_libstdcxx() -> str | None:
    """Path of the distribution's libstdc++.so.6 for this machine's architecture, or None."""
    if platform.system() != "Linux":
        return None
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine(), "")
    candidates = []
    for line in listing.splitlines():
        line = line.strip()
        if line.startswith("libstdc++.so.6 ") and "=>" in line:
            path = line.split("=>", 1)[1].strip()
            if os.path.exists(path):
                candidates.append((arch in line, path))
    candidates.sort(key=lambda c: not c[0])  # this architecture's first
    return candidates[0][1] if candidates else None


def preloaded(lib: str) -> bool:
    return lib in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()


def reexec_with_system_libstdcxx() -> None:
    """Replace this process with itself under LD_PRELOAD=<system libstdc++>, once."""
    if os.environ.get("ARLE_NO_PRELOAD") == "1" or os.environ.get(MARKER) == "1":
        return
    lib = system_libstdcxx()
    if lib is None or preloaded(lib):
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
    env[MARKER] = "1"
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:
        return  # carry on as we are; a load that then fails says what to do


def libstdcxx_problem() -> str | None:
    """A sentence on how to start this process when the system libstdc++ is not
    preloaded, else None. Which library wins cannot be read back from inside: on the
    CUDA image the crashing process maps only the system libstdc++ too (seen
    2026-11-29), so the rule is simply "preloaded, or the user opted out"."""
    lib = system_libstdcxx()
    if lib is None or preloaded(lib) or os.environ.get("ARLE_NO_PRELOAD") == "1":
        return None
    return (
        f"Compiled CUDA programs can crash at load unless the process starts with LD_PRELOAD={lib}; "
        "arle-runtime and arlec do this by themselves, other programs must set it (or ARLE_NO_PRELOAD=1 to skip)."
    )
