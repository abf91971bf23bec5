"""`arlec doctor`: what this machine can build and run, one finding per line.

Each check returns a Finding (ok / warn / fail, a detail, advice when not ok). Nothing
here raises for a missing piece: a missing optional tool is a warn, a missing required
one a fail, and the CLI turns the worst status into the exit code.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 11)
LOW_DISK_BYTES = 2 << 30  # a default bundle is ~150 MB; a compile needs scratch space besides
SANDBOX_TIMEOUT_S = 10


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # ok | warn | fail
    detail: str
    advice: str = ""


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_python() -> Finding:
    here = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Finding("python", "fail", f"{here} ({sys.executable})", "arle needs Python 3.11 or newer.")
    return Finding("python", "ok", f"{here} ({sys.executable})")


def check_torch() -> Finding:
    try:
        import torch
    except ImportError as e:
        return Finding("torch", "fail", f"not importable ({e})", "pip install torch==2.13.0")
    if _release(torch.__version__)[:2] < MIN_TORCH:
        return Finding("torch", "fail", torch.__version__, "arle needs torch 2.11 or newer.")
    return Finding("torch", "ok", f"{torch.__version__}, {torch.get_num_threads()} threads")


def check_triton() -> Finding:
    found = _package_version("triton")
    if found is None:
        return Finding("triton", "warn", "not installed (optional)", "Only cuda builds need triton; it comes with CUDA torch wheels.")
    return Finding("triton", "ok", found)


def check_cuda() -> list[Finding]:
    try:
        import torch
    except ImportError:
        return [Finding("cuda", "warn", "torch missing, CUDA not checked", "Install torch first.")]
    built = torch.version.cuda
    if not torch.cuda.is_available():
        detail = "torch built without CUDA" if built is None else f"torch built for CUDA {built}, but no GPU is visible"
        return [Finding("cuda", "warn", detail, "cpu bundles only; cuda builds and cuda bundles need an NVIDIA GPU and driver.")]
    findings = []
    driver = _nvidia_smi("driver_version")
    findings.append(Finding("cuda", "ok", f"CUDA {built}, driver {driver or 'unknown'}, {torch.cuda.device_count()} GPU(s)"))
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        props = torch.cuda.get_device_properties(i)
        detail = f"{props.name}, capability {major}.{minor}, {props.total_memory / 2**30:.0f} GiB"
        if major < 8:
            findings.append(Finding(f"gpu {i}", "warn", detail, "bf16 kernels need capability 8.0 (Ampere) or newer."))
        else:
            findings.append(Finding(f"gpu {i}", "ok", detail))
    return findings


def _nvidia_smi(field: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def check_optional_backends() -> list[Finding]:
    findings = []
    for module, dist, use in (("tvm", "apache-tvm", "the metal target"), ("onnxruntime", "onnxruntime", "the onnx executor")):
        found = _package_version(dist) or _package_version(module)
        if found is None:
            findings.append(Finding(module, "warn", "not installed (optional)", f"Needed only for {use}."))
        else:
            findings.append(Finding(module, "ok", found))
    return findings


def check_sandbox() -> Finding:
    """The agent's tools run under bubblewrap with no network; both must work here."""
    exe = shutil.which("bwrap")
    if exe is None:
        return Finding("sandbox", "warn", "bwrap (bubblewrap) not on PATH",
                       "apt-get install bubblewrap; without it the agent's tools cannot be sandboxed.")
    try:
        proc = subprocess.run([exe, "--unshare-net", "--ro-bind", "/", "/", "true"], capture_output=True, text=True,
                              timeout=SANDBOX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Finding("sandbox", "warn", f"{exe} did not finish in {SANDBOX_TIMEOUT_S} s", "Check that bwrap runs here.")
    except OSError as e:
        return Finding("sandbox", "warn", f"{exe} could not start ({e})", "Check that bwrap runs here.")
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return Finding("sandbox", "warn", f"{exe} cannot create a network namespace ({reason})",
                       "Allow unprivileged user namespaces (kernel.unprivileged_userns_clone=1) or run where they are.")
    return Finding("sandbox", "ok", f"{exe}, network namespace ok")


def check_disk(path: Path) -> Finding:
    free = shutil.disk_usage(path).free
    detail = f"{free / 2**30:.1f} GiB free in {path}"
    if free < LOW_DISK_BYTES:
        return Finding("disk", "warn", detail, "Builds need a few GiB of scratch space; free some or build elsewhere (--out).")
    return Finding("disk", "ok", detail)


def check_bundle(path: str) -> Finding:
    from arle_runtime.bundle import check_compatibility, read_manifest, verify_artifacts
    from arle_runtime.errors import ArleError

    root = Path(path)
    if not root.exists():
        raise ArleError(f"Bundle {root} does not exist; pass the folder that `arlec build` wrote.")
    try:
        manifest = read_manifest(root)
        check_compatibility(root, manifest)
        verify_artifacts(root, manifest, hashes=False)
    except ArleError as e:
        return Finding("bundle", "fail", e.message, "Rebuild the bundle on this machine with `arlec build`.")
    t = manifest["target"]
    return Finding("bundle", "ok", f"{root}: {t['name']} ({t['executor']}), {len(manifest['artifacts'])} files present")


def run_checks(bundle: str | None = None, cwd: Path | None = None) -> list[Finding]:
    findings = [check_python(), check_torch(), check_triton(), *check_cuda(), *check_optional_backends(), check_sandbox(),
                check_disk(cwd or Path.cwd())]
    if bundle is not None:
        findings.append(check_bundle(bundle))
    return findings


def exit_code(findings: list[Finding], strict: bool = False) -> int:
    bad = {"fail", "warn"} if strict else {"fail"}
    return 1 if any(f.status in bad for f in findings) else 0


def as_dict(findings: list[Finding], strict: bool = False) -> dict:
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "exit_code": exit_code(findings, strict),
        "findings": [asdict(f) for f in findings],
    }


def table(findings: list[Finding]) -> str:
    width = max(len(f.name) for f in findings) + 2
    lines = [f"{'check':<{width}}{'status':<8}detail", "-" * (width + 8 + 40)]
    for f in findings:
        lines.append(f"{f.name:<{width}}{f.status:<8}{f.detail}")
        if f.advice and f.status != "ok":
            lines.append(f"{'':<{width + 8}}-> {f.advice}")
    counts = {s: sum(f.status == s for f in findings) for s in ("ok", "warn", "fail")}
    lines.append(f"\n{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return "\n".join(lines)
