"""`arlec package`: a Docker build context that serves one bundle.

The context holds:
  Dockerfile                 rendered from templates/Dockerfile.<target>.j2
  requirements-runtime.txt   the runtime's own dependencies, torch pinned to the bundle's
  wheels/arle-*.whl          this project, installed with --no-deps
  bundle/                    the bundle, copied and re-verified
The image runs `arle-runtime serve /bundle --host 0.0.0.0` as a non-root user on port 8000
and reports healthy once /readyz answers 200. The compiler's dependencies (gguf,
transformers, tvm, onnx) stay out: the runtime never imports them (tests enforce it).
On request the context also holds scale-out files for --replicas N copies (docs/scale-out.md):
  serve-config.yaml          --ray: a Ray Serve config (the image then installs ray[serve] too)
  k8s.yaml                   --k8s: a Deployment of N pods, ready on /readyz, behind a Service
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from arle_runtime.bundle import read_manifest, verify_artifacts
from arle_runtime.atomic import atomic_dir
from arle_runtime.errors import ArleError

from . import __version__

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# The runtime's needs besides torch, as in pyproject's [project] dependencies.
RUNTIME_REQUIREMENTS = (
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "jinja2>=3.1",
    "click>=8.1",
    "tqdm>=4.66",
    "numpy>=1.26",
    "starlette>=0.40",
    "uvicorn>=0.30",
    "prometheus-client>=0.20",
)
CPU_BASE_IMAGE = "python:3.11-slim"


def project_root() -> Path:
    """The source tree this arlec runs from (a wheel of it goes into the image)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ArleError(
            f"arlec is installed without its source tree ({root} has no pyproject.toml); "
            "run `arlec package` from a checkout installed with `pip install -e .`."
        )
    return root


def cuda_base_image(cuda: str) -> str:
    parts = (cuda.split(".") + ["0", "0"])[:3]
    return f"nvidia/cuda:{'.'.join(parts)}-runtime-ubuntu24.04"


def requirements_text(manifest: dict) -> str:
    target = manifest["target"]
    req = target.get("requirements", {})
    torch_release = req.get("torch", "").split("+")[0]
    if not torch_release:
        raise ArleError("The bundle's manifest names no torch release; rebuild it with a current arlec.")
    lines = [f"# Runtime dependencies for bundle {manifest.get('name', '')} ({target['name']}), by arlec {__version__}."]
    if target["name"] == "cpu":
        lines += ["# The CPU wheel: the default Linux wheel carries CUDA libraries the image does not need.",
                  f"--extra-index-url {CPU_TORCH_INDEX}"]
    elif target["name"] == "cuda":
        cu = "cu" + "".join(str(req.get("cuda", "")).split(".")[:2])
        lines += [f"--extra-index-url https://download.pytorch.org/whl/{cu}"]
    lines.append(f"torch=={torch_release}")
    if target["name"] == "cuda" and req.get("triton"):
        lines.append(f"triton=={req['triton']}")
    lines += list(RUNTIME_REQUIREMENTS)
    return "\n".join(lines) + "\n"


def render_dockerfile(manifest: dict, image_name: str) -> str:
    target = manifest["target"]["name"]
    if target not in ("cpu", "cuda"):
        raise ArleError(f"arlec package makes images for cpu and cuda bundles; this bundle targets {target!r}.")
    env = Environment(loader=PackageLoader("arle_templates", ""), undefined=StrictUndefined, keep_trailing_newline=True)
    template = env.get_template(f"Dockerfile.{target}.j2")
    req = manifest["target"].get("requirements", {})
    return template.render(
        bundle_name=manifest.get("name", "bundle"),
        target=target,
        arlec_version=__version__,
        image_name=image_name,
        base_image=cuda_base_image(str(req.get("cuda", "13.0"))) if target == "cuda" else CPU_BASE_IMAGE,
    )


def _templates() -> Environment:
    return Environment(loader=PackageLoader("arle_templates", ""), undefined=StrictUndefined,
                       keep_trailing_newline=True)


def render_scale_out(manifest: dict, image_name: str, replicas: int, kind: str) -> str:
    """serve-config.yaml (kind "ray") or k8s.yaml (kind "k8s") for `replicas` copies of the image."""
    from arle_runtime.ray_serve import APP_NAME, DEPLOYMENT_NAME

    if replicas < 1:
        raise ArleError(f"--replicas must be at least 1, got {replicas}.")
    target = manifest["target"]["name"]
    gpus = 1 if target == "cuda" else 0
    template = _templates().get_template("ray-serve.yaml.j2" if kind == "ray" else "k8s.yaml.j2")
    return template.render(bundle_name=manifest.get("name", "bundle"), target=target, arlec_version=__version__,
                           replicas=replicas, name=image_name, image_name=image_name, app_name=APP_NAME,
                           deployment_name=DEPLOYMENT_NAME, cpus_per_replica=1, gpus_per_replica=gpus, gpus=gpus)


def build_wheel(dest: Path) -> Path:
    """`pip wheel --no-deps` of this checkout into dest (offline, no build isolation)."""
    root = project_root()
    with tempfile.TemporaryDirectory(prefix="arle-wheel-") as tmp:
        # A copy, so setuptools' build/ scratch does not land among the user's bundles in build/.
        src = Path(tmp) / "src"
        shutil.copytree(root, src, ignore=shutil.ignore_patterns(
            ".git", ".whl", "build", "*.egg-info", "__pycache__", ".venv", ".pytest_cache", "tests", "benchmarks", "docs", "*.arle"))
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src),
             "-w", str(dest)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise ArleError(f"Building the arle wheel failed ({tail}); check that setuptools and wheel are installed.")
    wheels = sorted(dest.glob("arle-*.whl"))
    if not wheels:
        raise ArleError(f"pip wheel wrote no arle wheel into {dest}.")
    return wheels[-1]


def package(bundle: str, out: str, force: bool = False, echo=print, *, ray: bool = False, k8s: bool = False,
            replicas: int = 2) -> dict:
    root = Path(bundle)
    manifest = read_manifest(root)
    verify_artifacts(root, manifest, hashes=True)
    out_dir = Path(out)
    if out_dir.exists() and not force:
        raise ArleError(f"{out_dir} already exists; pass --force to replace it.")
    name = manifest.get("name", root.stem)
    image_name = f"arle-{name}".lower().replace("_", "-")
    dockerfile = render_dockerfile(manifest, image_name)
    requirements = requirements_text(manifest)
    scale_out = {}
    if ray:
        from arle_runtime.ray_serve import RAY_REQUIREMENT

        scale_out["serve-config.yaml"] = render_scale_out(manifest, image_name, replicas, "ray")
        requirements += f"# Ray Serve, for serve-config.yaml (arlec package --ray).\n{RAY_REQUIREMENT}\n"
    if k8s:
        scale_out["k8s.yaml"] = render_scale_out(manifest, image_name, replicas, "k8s")
    with atomic_dir(out_dir) as tmp:
        (tmp / "Dockerfile").write_text(dockerfile)
        (tmp / "requirements-runtime.txt").write_text(requirements)
        for name, text in scale_out.items():
            (tmp / name).write_text(text)
        (tmp / ".dockerignore").write_text("**/__pycache__\n")
        echo("building the arle wheel")
        wheel = build_wheel(tmp / "wheels")
        echo(f"copying {root}")
        shutil.copytree(root, tmp / "bundle")
        verify_artifacts(tmp / "bundle", manifest, hashes=False)
        os.chmod(tmp, 0o755)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"out": out_dir, "image": image_name, "wheel": wheel.name, "target": manifest["target"]["name"],
            "bytes": size, "scale_out": sorted(scale_out)}
