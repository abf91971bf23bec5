"""`arle-runtime serve-ray`: two CPU replicas of the default bundle behind one Ray Serve
endpoint on loopback, driven with the official `openai` client, as a user would run it
(a subprocess; ARLE_THREADS=1, one Ray CPU per replica). Also the Serve config and the
Kubernetes manifests `arlec package` writes. No multi-host cluster is tested here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import assert_clean_error, run_cli

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")
yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
REPLICA_HEADER = "x-arle-replica"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer:
    """`arle-runtime serve-ray BUNDLE --replicas 2` in a subprocess; remembers every process it started."""

    def __init__(self, bundle: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._logf = open(log, "w")
        exe = Path(sys.executable).parent / "arle-runtime"
        self.proc = subprocess.Popen(
            [str(exe), "serve-ray", str(bundle), "--replicas", "2", "--cpus-per-replica", "1", "--port",
             str(self.port), "--no-verify"],
            stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "ARLE_THREADS": "1"},
        )
        self.started: dict[int, psutil.Process] = {}

    def _remember_children(self) -> None:
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.started.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def wait_ready(self, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._remember_children()
            if self.proc.poll() is not None:
                raise AssertionError(f"serve-ray exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            if "Ctrl-C stops" in self.log.read_text():  # printed once every replica warmed up
                self._remember_children()
                return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"serve-ray not ready within {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int | None:
        self._remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._logf.close()
        return self.proc.returncode

    def survivors(self) -> list[str]:
        out = []
        for p in self.started.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        return out


@pytest.fixture(scope="module")
def ray_server(default_bundle, tmp_path_factory):
    srv = RayServer(default_bundle, tmp_path_factory.mktemp("ray") / "serve-ray.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        # Last resort, so a failed test does not leave Ray running on the CI machine.
        for p in srv.started.values():
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def client(ray_server):
    return openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_two_replicas_answer_chat_through_one_endpoint(client):
    answer = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == "The capital of France is Paris."
    assert answer.choices[0].finish_reason == "stop"
    assert client.models.list().data[0].id == "default"


def test_streaming_through_the_ray_proxy_matches_the_full_answer(client):
    stream = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 5  # token by token, not one blob
    assert chunks[-1].usage.completion_tokens == 7


def test_concurrent_requests_land_on_both_replicas(client):
    def ask(i):
        raw = client.completions.with_raw_response.create(model="default", prompt=f"Count to {i}:", max_tokens=16,
                                                          temperature=0)
        assert raw.parse().choices[0].text
        return raw.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(8) as pool:
        replicas = list(pool.map(ask, range(16)))
    assert len(set(replicas)) == 2, replicas


def test_bad_requests_get_openai_errors_through_the_proxy(ray_server):
    r = httpx.post(f"{ray_server.url}/v1/chat/completions", json={"model": "nope", "messages": QUESTION}, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert r.headers[REPLICA_HEADER]


def test_sigterm_stops_cleanly_and_leaves_no_ray_processes(ray_server):
    assert len(ray_server.started) >= 4, ray_server.started  # gcs, raylet, controller, proxy, replicas, ...
    t0 = time.monotonic()
    assert ray_server.stop() == 0, ray_server.log.read_text()[-3000:]
    assert time.monotonic() - t0 < 45
    assert ray_server.survivors() == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{ray_server.url}/readyz", timeout=2)


# --- the replica's ASGI wrapper, in process ------------------------------------------------


def _lifespan_messages(ready: bool) -> list[dict]:
    """What Ray's lifespan runner sees from ReplicaApp when the warm-up did (not) succeed."""
    import asyncio
    from types import SimpleNamespace

    from arle_runtime.ray_serve import ReplicaApp

    async def warmed():
        return ready

    async def inner(scope, receive, send):  # a server app whose startup itself succeeded
        await receive()
        await send({"type": "lifespan.startup.complete"})

    inner.state = SimpleNamespace(arle=SimpleNamespace(warmed=warmed))
    sent = []

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        sent.append(message)

    asyncio.run(ReplicaApp(inner, "r1")({"type": "lifespan"}, receive, send))
    return sent


def test_a_replica_reports_started_only_after_a_good_warm_up():
    assert _lifespan_messages(ready=True) == [{"type": "lifespan.startup.complete"}]
    failed = _lifespan_messages(ready=False)
    assert [m["type"] for m in failed] == ["lifespan.startup.failed"] and "warm-up" in failed[0]["message"]


# --- bad input: one sentence, before Ray starts --------------------------------------------


def test_serve_ray_refuses_a_missing_bundle(tmp_path):
    proc = run_cli("arle-runtime", "serve-ray", str(tmp_path / "nope.arle"), timeout=60)
    assert_clean_error(proc, "nope.arle")


def _run_in_process(main, args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_serve_ray_refuses_more_cpus_than_the_machine_has(default_bundle, capsys):
    from arle_runtime.cli import main

    code, err = _run_in_process(main, ["serve-ray", str(default_bundle), "--replicas", "2", "--cpus-per-replica",
                                       str(os.cpu_count()), "--no-verify"], capsys)
    assert code == 2 and "lower --replicas" in err and err.count("\n") == 1, err


def test_serve_ray_refuses_zero_replicas(default_bundle, capsys):
    from arle_runtime.cli import main

    code, err = _run_in_process(main, ["serve-ray", str(default_bundle), "--replicas", "0"], capsys)
    assert code == 2 and "replicas must be at least 1" in err, err


def test_runtime_imports_ray_only_when_serving_on_it():
    code = "import sys, arle_runtime.ray_serve, arle_runtime.cli; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


# --- what `arlec package --ray --k8s` writes ----------------------------------------------------


@pytest.fixture(scope="module")
def scale_out_files(default_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("package") / "ctx"
    proc = run_cli("arlec", "package", str(default_bundle), "--out", str(out), "--ray", "--k8s", "--replicas", "3")
    assert proc.returncode == 0, proc.stderr
    assert "serve deploy" in proc.stdout and "kubectl apply" in proc.stdout
    assert "ray[serve]==2.60.0" in (out / "requirements-runtime.txt").read_text().splitlines()
    return {"ray": (out / "serve-config.yaml").read_text(), "k8s": (out / "k8s.yaml").read_text()}


def test_package_replicas_without_ray_or_k8s_is_refused(default_bundle, tmp_path, capsys):
    from arlec.cli import main

    code, err = _run_in_process(main, ["package", str(default_bundle), "--out", str(tmp_path / "ctx"), "--replicas",
                                       "3"], capsys)
    assert code == 2 and "--replicas goes with --ray or --k8s" in err, err
    assert not (tmp_path / "ctx").exists()


def test_packaged_serve_config_is_valid_and_builds_the_replicas(scale_out_files, default_bundle):
    from ray.serve.schema import ServeDeploySchema

    from arle_runtime.ray_serve import DEPLOYMENT_NAME, build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load(scale_out_files["ray"]))
    app = config.applications[0]
    assert (app.import_path, app.route_prefix) == ("arle_runtime.ray_serve:build_app", "/")
    assert app.args["bundle"] == "/bundle" and app.args["replicas"] == 3
    # The builder Ray calls with those args (the bundle path as in this checkout).
    built = build_app({**app.args, "bundle": str(default_bundle)})
    deployment = built._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME and deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 1 and deployment.ray_actor_options["num_gpus"] == 0


def test_serve_config_with_a_bad_argument_says_which(default_bundle):
    from arle_runtime.errors import ArleError
    from arle_runtime.ray_serve import build_app

    with pytest.raises(ArleError, match="replica_count"):
        build_app({"bundle": str(default_bundle), "replica_count": 2})
    with pytest.raises(ArleError, match="args.bundle"):
        build_app({"replicas": 2})


def test_packaged_k8s_manifests_run_n_pods_ready_on_readyz(scale_out_files):
    deployment, service = yaml.safe_load_all(scale_out_files["k8s"])
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user
    assert "resources" not in container  # a cpu bundle asks for no GPU
    assert service["kind"] == "Service"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
