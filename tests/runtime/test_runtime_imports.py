"""The serving image installs the runtime alone: it must not import the compiler side."""

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
