"""`arle-runtime serve --http-processes N`: N HTTP processes in front of one engine process.

One HTTP process spends ~85 us of CPU per streamed token (JSON, SSE events, the ASGI send
chain; docs/perf/cuda-h200.md), so at high concurrency it, not the engine, sets the
server's ceiling. Here the process that runs `serve` binds the port, starts the engine
process with one line per HTTP process (runtime/engine_process.py), then starts the HTTP
processes. They share the listening socket (the kernel hands each new connection to one
of them) and each talks to the engine on its own line. This process serves nothing: it
waits, and on Ctrl-C / SIGTERM, or when any of its processes dies, stops them all, the
HTTP processes first (their live requests end with "abort"), then the engine.

Metrics: each HTTP process counts into prometheus-client's multiprocess files in a
temporary folder ($PROMETHEUS_MULTIPROC_DIR), so a scrape of /metrics, whichever process
answers it, sums all of them (runtime/server.py, Metrics).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .bundle import load_bundle
from .engine_process import EngineClient, RemoteSession, start_engine_process, stop_engine_process
from .errors import ArleError


def serve_processes(bundle_path: str | Path, open_session: Callable, processes: int, host: str, port: int, *,
                    api_key: str | None = None, request_timeout: float = 600.0, log_level: str = "info") -> None:
    """Serve until Ctrl-C / SIGTERM (a clean return) or until one of the processes dies
    (ArleError naming it)."""
    if processes < 2:
        raise ArleError(f"serve_processes needs at least 2 HTTP processes, got {processes}.")
    load_bundle(bundle_path, verify=False)  # a missing or foreign bundle fails before any process starts
    sock = _listen(host, port)
    # SIGTERM stops as Ctrl-C does (the CLI does this too; a benchmark's server subprocess may not)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    metrics_dir = tempfile.mkdtemp(prefix="arle-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the spawned processes inherit it
    engine = control = None
    workers: list = []
    try:
        # line 0 is this process's (it hears "ready", later says "close"); 1..N the HTTP processes'
        engine, conns, limits = start_engine_process(open_session, clients=processes + 1)
        control, lines = conns[0], conns[1:]
        ctx = multiprocessing.get_context("spawn")
        for index, line in enumerate(lines):
            worker = ctx.Process(target=_http_process_main, name=f"arle-http-{index + 1}",
                                 args=(index, processes, line, limits, sock, str(bundle_path), host, port, api_key,
                                       request_timeout, log_level))
            worker.start()
            workers.append(worker)
            line.close()  # the HTTP process holds it now: its exit is the engine's EOF on that line
        bound = sock.getsockname()[1]  # the port itself when --port 0 asked for any free one
        sock.close()
        print(f"arle: serving on http://{host}:{bound} from {processes} HTTP processes and one engine process "
              "(Ctrl-C to stop)", file=sys.stderr, flush=True)
        _wait_for_an_exit(engine, workers)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI's handler: a clean stop
        pass
    finally:
        _stop(workers, engine, control)
        sock.close()
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ArleError(f"The server could not start on {host}:{port} ({e.strerror or e}).") from None
    sock.listen(2048)
    return sock


def _http_process_main(index: int, processes: int, line, limits, sock: socket.socket, bundle_path: str, host: str,
                       port: int, api_key: str | None, request_timeout: float, log_level: str) -> None:
    from .server import serve

    # requests numbered index+1, index+1+N, ...: no two HTTP processes use one id
    session = RemoteSession.attach(bundle_path, EngineClient(line, limits, first_id=index + 1, id_step=processes))
    serve(session, host, port, api_key=api_key, request_timeout=request_timeout, log_level=log_level, sock=sock)


def _wait_for_an_exit(engine, workers: list) -> None:
    names = {engine.sentinel: ("The engine process", engine)}
    names.update({w.sentinel: (f"HTTP process {i + 1}", w) for i, w in enumerate(workers)})
    ready = multiprocessing.connection.wait(list(names))
    name, proc = names[ready[0]]
    proc.join(5)
    raise ArleError(f"{name} exited (exit code {proc.exitcode}), so the server stopped; its log is above.")


def _stop(workers: list, engine, control) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.terminate()  # SIGTERM: uvicorn's graceful stop, live requests end with "abort"
    for worker in workers:
        worker.join(15)
        if worker.is_alive():
            worker.kill()
            worker.join(5)
    if engine is not None:
        stop_engine_process(engine, control)
        control.close()
