"""The serving image installs the runtime alone: it must not import the compiler side."""

import os
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("arlec", "arle_targets", "tvm", "onnx", "onnxruntime", "transformers")
RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def runtime_modules():
    for path in sorted(RUNTIME.rglob("*.py")):
        parts = path.relative_to(RUNTIME).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(("arle_runtime", *parts))


def test_runtime_modules_import_no_compiler_packages():
    modules = list(runtime_modules())
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"runtime imported {proc.stdout.strip()}"


# The onnx and tvm executors import onnxruntime / tvm inside functions, only when their bundle loads
# (the first test checks that importing the runtime does not pull it in).
LAZY_ALLOWED = {"onnx_executor.py": ("onnxruntime",), "tvm_executor.py": ("tvm",)}


def test_runtime_sources_have_no_compiler_imports():
    import re

    offenders = []
    for p in RUNTIME.rglob("*.py"):
        allowed = LAZY_ALLOWED.get(p.name, ())
        names = [n for n in FORBIDDEN if n not in allowed]
        pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(names)})\b", re.M)
        top_level = re.compile(rf"^(from|import)\s+({'|'.join(allowed)})\b", re.M) if allowed else None
        if pattern.search(p.read_text()) or (top_level and top_level.search(p.read_text())):
            offenders.append(p.name)
    assert offenders == []


def test_running_a_bundle_imports_no_compiler_stack_of_torch(default_bundle):
    """A cold start pays for every import: torch's own AOTInductor wrapper pulls in the export
    serializer, dynamo and sympy (2.3 s of a 5.8 s start of the default bundle on the CPU
    machine). The runtime's loader (executor.AotiProgram) must keep them out."""
    code = (
        "import sys\n"
        "from arle_runtime.session import Session\n"
        f"session = Session.open({str(default_bundle)!r})\n"
        "ids = session.encode('Hello')\n"
        "from arle_runtime.sampler import SamplingParams\n"
        "rid = session.engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0))\n"
        "outs = []\n"
        "while not any(o.finished for o in outs):\n"
        "    outs += [o for o in session.engine.step() if o.request_id == rid]\n"
        "heavy = ('torch._dynamo', 'sympy', 'torch.export.pt2_archive', 'torch._inductor', 'triton')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last_line = proc.stdout.splitlines()[-1]  # the session may print nothing else; this line is always there
    assert last_line == "", f"running a bundle imported {last_line}"
