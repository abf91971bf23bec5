"""Replicas of one bundle behind one endpoint, on Ray Serve (issue 11, item 4).

Each replica is a Ray actor that opens the bundle (its own Session, engine and KV pool)
and serves the very app `arle-runtime serve` serves (runtime/server.py). Ray's HTTP proxy
is the one endpoint: it routes every request to a replica (power of two choices on
queue length) and streams SSE answers back. Ray does the placement, restarts and
scaling across hosts; this module only says what one replica is.

- `build_app(args)` is a Ray Serve application builder: a Serve config file (what
  `arlec package --ray` writes) names `arle_runtime.ray_serve:build_app` and its args.
- `serve_ray(options, ...)` backs `arle-runtime serve-ray`: it starts a local Ray (or
  joins one with --address), deploys, waits for SIGTERM / Ctrl-C, and tears down.

Ray is an optional extra (`pip install 'arle[ray]'`), imported only here and only when
used, so the serving image without it stays lean.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import ArleError

log = logging.getLogger("arle.ray")

APP_NAME = "arle"
DEPLOYMENT_NAME = "ArleReplica"
REPLICA_HEADER = "x-arle-replica"
RAY_EXTRA = "pip install 'arle[ray]'"
RAY_REQUIREMENT = "ray[serve]==2.60.0"  # as pyproject's `ray` extra; images made with `arlec package --ray` pin it too
# Ray Serve's default (5 in flight per replica) would starve continuous batching; the
# engine has its own waiting queue (--max-queue) and answers 429 when it is full.
DEFAULT_MAX_ONGOING = 256
# A replica that cannot load its bundle will not load it on the next try either.
CONSTRUCTOR_RETRIES = 1


@dataclass(frozen=True)
class ReplicaOptions:
    """What every replica is started with; parsed once at the edge (CLI or Serve config args)."""

    bundle: str
    replicas: int = 2
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None  # default: 1 for a cuda bundle, else 0 (see resolved())
    threads: int | None = None  # ARLE_THREADS in each replica (default: its CPUs, at least 1)
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING
    api_key: str | None = None
    request_timeout: float = 600.0
    max_batch: int | None = None
    max_queue: int = 1024
    kv_pages: int | None = None
    max_batched_tokens: int | None = None
    verify: bool = True

    def __post_init__(self):
        def at_least(name, value, low):
            if value is not None and value < low:
                raise ArleError(f"{name.replace('_', '-')} must be at least {low}, got {value}.")

        for name in ("replicas", "max_ongoing_requests", "max_queue", "threads", "max_batch", "kv_pages",
                     "max_batched_tokens"):
            at_least(name, getattr(self, name), 1)
        at_least("cpus_per_replica", self.cpus_per_replica, 0)
        at_least("gpus_per_replica", self.gpus_per_replica, 0)
        if self.request_timeout <= 0:
            raise ArleError(f"timeout must be positive, got {self.request_timeout:g}.")

    @classmethod
    def from_args(cls, args: dict) -> "ReplicaOptions":
        """From a Serve config's `args` mapping (YAML: plain strings, numbers, booleans)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ArleError(f"Unknown arle Ray Serve argument(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}.")
        if not args.get("bundle"):
            raise ArleError("The arle Ray Serve application needs args.bundle, the bundle's path on every node.")
        return cls(**args)

    def resolved(self, manifest: dict) -> "ReplicaOptions":
        """Defaults that depend on the bundle filled in; checks that need its manifest."""
        gpus = self.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if manifest["target"]["name"] == "cuda" else 0.0
        batch = self.max_batch or manifest["buckets"]["max_batch"]
        if self.max_batched_tokens is not None and self.max_batched_tokens < batch:
            raise ArleError(f"max-batched-tokens must be at least the batch size ({batch}): every running "
                            f"request decodes one token per step; got {self.max_batched_tokens}.")
        return replace(self, bundle=str(Path(self.bundle).resolve()), gpus_per_replica=gpus)

    @property
    def replica_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_replica))

    def actor_options(self) -> dict:
        env = {"ARLE_THREADS": str(self.replica_threads)}
        # A replica is a Ray worker, not a process arle-runtime starts, so it cannot
        # re-exec itself with the system libstdc++ preloaded (runtime/preload.py); the
        # worker gets the variable from its start instead.
        from .preload import MARKER, system_libstdcxx

        lib = system_libstdcxx()
        if lib and os.environ.get("ARLE_NO_PRELOAD") != "1":
            env.update({"LD_PRELOAD": lib, MARKER: "1"})
        return {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica or 0,
                "runtime_env": {"env_vars": env}}


def _import_serve():
    try:
        from ray import serve
    except ImportError:
        raise ArleError(f"Serving replicas on Ray needs Ray Serve, which is not installed; "
                        f"run `{RAY_EXTRA}`.") from None
    return serve


class ArleReplica:
    """One replica: the bundle's Session and the same Starlette app as `arle-runtime serve`."""

    def __init__(self, options: dict):
        from .engine import EngineConfig
        from .session import Session

        self.options = ReplicaOptions(**options)
        o = self.options
        config = EngineConfig(max_batch=o.max_batch, max_waiting=o.max_queue, kv_pages=o.kv_pages,
                              max_num_batched_tokens=o.max_batched_tokens)
        self.session = Session.open(o.bundle, verify=o.verify, engine_config=config)
        self.replica_id = _serve_replica_id()

    def __serve_build_asgi_app__(self):
        from .server import create_app

        app = create_app(self.session, api_key=self.options.api_key, request_timeout=self.options.request_timeout)
        return ReplicaApp(app, self.replica_id)


def _serve_replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not inside a Ray Serve replica
        return f"pid{os.getpid()}"


class ReplicaApp:
    """ASGI around the server app: names the replica in a header on every answer, and
    reports lifespan startup complete only after the warm-up generation, so Ray routes
    to a replica only once it can answer (and fails a replica whose warm-up fails)."""

    def __init__(self, app, replica_id: str):
        self.app, self.replica_id = app, replica_id
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self._after_warm_up(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = (REPLICA_HEADER.encode(), self.replica_id.encode())

        async def named_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, named_send)

    def _after_warm_up(self, send):
        async def lifespan_send(message):
            if message["type"] == "lifespan.startup.complete" and not await self.state.arle.warmed():
                message = {"type": "lifespan.startup.failed",
                           "message": "The warm-up generation failed; see the replica's log."}
            await send(message)

        return lifespan_send


def deployment(options: ReplicaOptions):
    """The Ray Serve deployment of ArleReplica with these options' resources."""
    serve = _import_serve()
    replica_cls = serve.ingress()(ArleReplica)
    return serve.deployment(
        replica_cls, name=DEPLOYMENT_NAME, num_replicas=options.replicas, ray_actor_options=options.actor_options(),
        max_ongoing_requests=options.max_ongoing_requests, max_constructor_retry_count=CONSTRUCTOR_RETRIES,
    )


def build_app(args: dict):
    """Ray Serve application builder (`import_path: arle_runtime.ray_serve:build_app`)."""
    options = ReplicaOptions.from_args(dict(args))
    options = options.resolved(check_bundle(options.bundle, verify=False))
    return deployment(options).bind(asdict(options))


def check_bundle(path: str, verify: bool) -> dict:
    """Files and manifest checked here, once; the device check happens on each replica's node."""
    from .bundle import read_manifest, verify_artifacts

    root = Path(path)
    manifest = read_manifest(root)
    verify_artifacts(root, manifest, hashes=verify)
    return manifest


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ArleError(f"The endpoint cannot listen on {host}:{port} (is the port in use?).") from None


def _check_resources(options: ReplicaOptions, cluster: dict, local: bool) -> None:
    for kind, per in (("CPU", options.cpus_per_replica), ("GPU", options.gpus_per_replica)):
        need, have = per * options.replicas, cluster.get(kind, 0)
        if need > have:
            message = (f"{options.replicas} replicas x {per:g} {kind}s need {need:g} {kind}s, but the Ray cluster "
                       f"has {have:g}; lower --replicas or --{kind.lower()}s-per-replica (fractions are allowed).")
            if local:
                raise ArleError(message)
            log.warning("%s Waiting for the cluster to grow.", message)


def serve_ray(options: ReplicaOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
              echo=print) -> None:
    """Deploy the replicas behind http://host:port and serve until SIGTERM / Ctrl-C."""
    options = options.resolved(check_bundle(options.bundle, options.verify))
    local = address is None
    if local:  # checked before Ray starts (that alone takes ~15 s on 2 cores)
        _check_port_free(host, port)
        _check_resources(options, {"CPU": os.cpu_count(), "GPU": float("inf")}, local)
    serve = _import_serve()
    import ray

    started = time.perf_counter()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if local:
            # The object store holds nothing big here (requests go through the proxy).
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 * 2**20,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        # ray.init puts its C++ crash reporter on SIGTERM (a stack dump, then an abort at
        # exit); ours turns SIGTERM into the clean stop below, as for `arle-runtime serve`.
        for sig, handler in handlers.items():
            if callable(handler):
                signal.signal(sig, handler)
        _check_resources(options, ray.cluster_resources(), local)
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(deployment(options).bind(asdict(options)), name=APP_NAME, route_prefix="/", blocking=False)
        except ArleError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray's deploy failure carries the replica's traceback
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise ArleError(f"The replicas did not start ({reason[:300]}); "
                            "the Ray log above has the details.") from None
        echo(f"arle: serving {options.bundle} with {options.replicas} replica(s) on http://{host}:{port} "
             f"(ready in {time.perf_counter() - started:.1f} s); Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # SIGTERM arrives as this too (runtime/cli.py): a clean stop
        echo("arle: stopping the replicas")
    finally:
        if ray.is_initialized():
            import psutil  # Ray ships it (ray/thirdparty_files)

            ours = psutil.Process().children(recursive=True)
            try:  # our own Ray goes away whole; on a shared cluster only our application does
                _shutdown_serve(serve) if local else serve.delete(APP_NAME)
            finally:
                ray.shutdown()
                _reap(ours)


def _shutdown_serve(serve, timeout_s: float = 15.0) -> None:
    """serve.shutdown(), but waiting at most timeout_s for the controller, not Ray's 30 s:
    when SIGTERM went to the whole process group (`timeout`, systemd), the controller is
    already gone and there is nothing to wait for."""
    try:
        from ray.serve.context import _check_cached_client_alive, _disconnect
    except ImportError:  # a Ray other than the pinned one
        return serve.shutdown()
    client, _ = _check_cached_client_alive()
    if client is not None:
        client.shutdown(timeout_s=timeout_s)
    _disconnect()


def _reap(procs, grace: float = 2.0) -> None:
    """End what ray.shutdown() left of the processes this one started. Seen with Ray 2.60:
    the dashboard and runtime-env agents log that the raylet is gone, then hang instead of
    exiting, ignoring SIGTERM."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
