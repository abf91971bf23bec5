"""The engine in a process of its own, for `arle-runtime serve`.

The HTTP layer (JSON, tokenizing prompts, SSE events) and the engine loop (scheduling,
sampling, detokenizing) are both Python. In one process they share one GIL: at 64
streams on an H100 the server delivered 10.3k tok/s where the engine alone made 21k
(docs/perf/cuda-h200.md). So the server's process keeps the HTTP layer and a child
process runs the engine; they talk over a pipe, one message per request in and one per
engine step out.

`RemoteSession.start(path, open_session)` spawns the child, which calls `open_session()`
(a picklable callable returning a Session) and answers "ready" with the executor's step
limits, or with the ArleError that stopped it. The server holds the RemoteSession: the
bundle's tokenizer and chat template here, and `background()`, an EngineProcess with
BackgroundEngine's surface (submit_async, cancel, stats_async, alive, close).

One HTTP process still caps a server at high concurrency (~85 us of its CPU per streamed
token, docs/perf/cuda-h200.md), so the engine process can take several lines, one per
HTTP process (`serve --http-processes N`, runtime/http_processes.py): each line's
requests are numbered apart and their outputs go back on the line they came in on.

Messages, server -> engine: ("submit", rid, prompt_ids, params), ("cancel", rid),
("stats", key), ("close",). Engine -> server: ("ready", limits), ("failed", error),
("ack", rid, error or None), ("stats", key, dict), ("out", ids, tokens, texts, others): a
step's outputs as columns (pack_outputs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .bundle import Bundle, load_bundle
from .chat import ChatTemplate
from .engine.background import STOPPED, BackgroundEngine, RequestStream, wake_loops
from .engine.llm_engine import RequestOutput
from .errors import ArleError
from .executor import StepLimits
from .sampler import SamplingParams
from .session import Tokenizing, chat_template

log = logging.getLogger("arle.engine")


# --- the child --------------------------------------------------------------------------


def _engine_main(conns: list, open_session: Callable) -> None:
    """The engine process. `conns[0]` belongs to the process that started it (it hears
    "ready" or "failed"); each conn is one HTTP process's line to the engine (`serve
    --http-processes N` gives it N). Outputs go back on the conn their request came in on.
    The engine stops on ("close",) or once every conn is closed."""
    # Ctrl-C in a terminal reaches the whole process group; the server's process decides
    # when the engine stops (it cancels live requests first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()
    owner: dict[int, object] = {}  # live request id -> the conn it came in on

    def send(conn, message) -> None:
        try:
            with lock:
                conn.send(message)
        except OSError:  # that HTTP process is gone; the loop below sees its EOF
            pass

    def deliver(outputs: list[RequestOutput]) -> None:
        by_conn: dict[object, list[RequestOutput]] = {}
        with lock:
            for out in outputs:
                conn = owner.pop(out.request_id, None) if out.finished else owner.get(out.request_id)
                if conn is not None:
                    by_conn.setdefault(conn, []).append(out)
        for conn, outs in by_conn.items():
            send(conn, ("out", *pack_outputs(outs)))

    try:
        session = open_session()
        engine = BackgroundEngine(session.engine, deliver=deliver)
    except ArleError as e:
        send(conns[0], ("failed", e))
        return
    except Exception as e:  # noqa: BLE001 - reported to the server's process as one sentence
        log.exception("the engine could not start")
        send(conns[0], ("failed", ArleError(f"The engine could not start: {e!r}.")))
        return
    send(conns[0], ("ready", session.limits))
    live = list(conns)
    try:
        while live:
            for conn in multiprocessing.connection.wait(live):
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # that HTTP process is gone: its requests end
                    live.remove(conn)
                    with lock:
                        orphans = [rid for rid, c in owner.items() if c is conn]
                    for rid in orphans:
                        engine.cancel(rid)
                    continue
                if not _handle(message, conn, engine, session, owner, lock, send):
                    return
    finally:
        engine.close()
        session.close()


def _handle(message, conn, engine: BackgroundEngine, session, owner: dict, lock, send) -> bool:
    """One message from an HTTP process; False for ("close",)."""
    kind = message[0]
    if kind == "submit":
        _, rid, prompt_ids, params = message
        with lock:  # routed before it is queued: its first output may come at once
            owner[rid] = conn
        try:
            engine.enqueue(prompt_ids, params, rid)
            error = None
        except ArleError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - the request fails, the engine carries on
            log.exception("could not queue request %d", rid)
            error = ArleError(f"internal error queueing the request: {e!r}")
        if error is not None:
            with lock:
                owner.pop(rid, None)
        send(conn, ("ack", rid, error))
    elif kind == "cancel":
        engine.cancel(message[1])
    elif kind == "stats":
        send(conn, ("stats", message[1], session.engine.stats()))
    elif kind == "close":
        return False
    return True


def pack_outputs(outputs: list[RequestOutput]) -> tuple[list, list, list, list]:
    """A step's outputs for the pipe: the plain ones (a token and its text, nothing else)
    as three columns, the rest (finished, logprobs, errors) whole. Pickling 64 plain
    RequestOutputs took 168 us and unpickling 84 us; the columns take ~8 and ~5 (+30 to
    rebuild them on the other side), measured on the 2-core CPU."""
    ids, tokens, texts, others = [], [], [], []
    for out in outputs:
        if out.finished or out.logprob is not None or out.top_logprobs or out.error or out.result is not None:
            others.append(out)
        else:
            ids.append(out.request_id)
            tokens.append(out.token)
            texts.append(out.text)
    return ids, tokens, texts, others


def unpack_outputs(ids: list, tokens: list, texts: list, others: list) -> list[RequestOutput]:
    return [RequestOutput(*row) for row in zip(ids, tokens, texts)] + others


def start_engine_process(open_session: Callable, clients: int = 1):
    """Spawn the engine process with `clients` lines to it and wait until it has loaded the
    bundle: (process, [conn, ...], limits). Raises the ArleError that stopped the load."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
    pairs = [ctx.Pipe() for _ in range(clients)]
    proc = ctx.Process(target=_engine_main, args=([child for _, child in pairs], open_session),
                       name="arle-engine", daemon=True)
    proc.start()
    for _, child in pairs:
        child.close()
    conns = [ours for ours, _ in pairs]
    try:
        message = conns[0].recv()
    except EOFError:
        proc.join(5)
        _close_all(conns)
        raise ArleError(f"The engine process exited while loading the bundle (exit code {proc.exitcode}); "
                        "its log is above.") from None
    if message[0] == "failed":
        proc.join(10)
        _close_all(conns)
        raise message[1]
    return proc, conns, message[1]


def _close_all(conns) -> None:
    for conn in conns:
        conn.close()


def stop_engine_process(proc, conn, timeout: float = 10.0) -> None:
    """Ask the engine to stop (live requests end with an error) and wait for it."""
    if proc.is_alive():
        with contextlib.suppress(OSError):  # it died meanwhile
            conn.send(("close",))
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


# --- the server's side ----------------------------------------------------------------------


class EngineClient:
    """One HTTP process's line to the engine process: BackgroundEngine's surface
    (submit_async, cancel, stats_async, alive, close). With several HTTP processes, each
    numbers its requests `first_id`, `first_id + id_step`, ... so ids never collide."""

    def __init__(self, conn, limits: StepLimits, first_id: int = 1, id_step: int = 1):
        self._conn = conn
        self.limits = limits
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[int, RequestStream] = {}
        self._replies: dict[tuple, concurrent.futures.Future] = {}
        self._ids = itertools.count(first_id, id_step)
        self._keys = itertools.count(1)
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read, name="arle-engine-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._dead is None

    # requests
    async def submit_async(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request in the engine; raises its ArleError (bad prompt, queue full) here."""
        rid = next(self._ids)
        stream = RequestStream(rid, asyncio.get_running_loop())
        with self._lock:
            self._check_alive()
            self._streams[rid] = stream
        try:
            error = await asyncio.wrap_future(self._ask(("submit", rid, list(prompt_ids), params), ("ack", rid)))
        except BaseException:
            self._forget(rid)
            raise
        if error is not None:
            self._forget(rid)
            raise error
        return stream

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._streams.pop(rid, None)
        self.cancel(rid)

    def cancel(self, request_id: int) -> None:
        """End a request; its stream's last output says "abort" (a no-op once it finished)."""
        if self.alive:
            with contextlib.suppress(ArleError):  # it died meanwhile: the reader ends the stream
                self._send(("cancel", request_id))

    async def stats_async(self) -> dict:
        key = next(self._keys)
        return await asyncio.wrap_future(self._ask(("stats", key), ("stats", key)))

    def close(self, timeout: float = 10.0) -> None:
        """Hang up: the engine cancels this line's live requests and serves the others."""
        self._dead = self._dead or "The server is shutting down."
        self._hang_up(timeout)

    def _hang_up(self, timeout: float) -> None:
        # Shut the socket down before closing it: that wakes the reader thread, blocked in
        # recv(), with an EOF (closing the fd under it would not).
        with contextlib.suppress(OSError):
            with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout)
        self._conn.close()

    # the pipe
    def _check_alive(self) -> None:
        if not self.alive:
            raise ArleError(self._dead or "The engine process has stopped; restart the server.", code=STOPPED)

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the engine is gone (or we hung up); the reader thread ends what was live
            raise ArleError("The engine process has stopped; restart the server.", code=STOPPED) from None

    def _ask(self, message, key: tuple) -> concurrent.futures.Future:
        reply: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_alive()
            self._replies[key] = reply
        self._send(message)
        return reply

    def _read(self) -> None:
        """The reader thread: hands outputs to their streams and replies to their askers."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "out":
                    self._dispatch(unpack_outputs(*message[1:]))
                else:  # ("ack", rid, error) or ("stats", key, dict)
                    with self._lock:
                        reply = self._replies.pop(message[:2], None)
                    if reply is not None:
                        with contextlib.suppress(concurrent.futures.InvalidStateError):  # its asker gave up
                            reply.set_result(message[2])
        except (EOFError, OSError):
            pass
        finally:
            self._end_all(self._gone())

    def _gone(self) -> str:
        return "The engine process stopped; restart the server."

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """One wake-up per event loop per step, as BackgroundEngine._deliver does."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream._loop, []).append((stream, out))
        wake_loops(by_loop, self.cancel)

    def _end_all(self, message: str) -> None:
        """The engine process is gone: fail the pending replies and end every live stream."""
        with self._lock:
            self._dead = self._dead or message
            live = list(self._streams)
            replies, self._replies = list(self._replies.values()), {}
        for reply in replies:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                reply.set_exception(ArleError(message, code=STOPPED))
        self._dispatch([RequestOutput(rid, None, "", True, "error", error=message) for rid in live])


class EngineProcess(EngineClient):
    """The engine child, started and owned by the one HTTP process that talks to it."""

    def __init__(self, open_session: Callable):
        self._proc, (conn,), limits = start_engine_process(open_session)
        super().__init__(conn, limits)

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests still live end with an error."""
        stop_engine_process(self._proc, self._conn, timeout)
        self._hang_up(timeout)

    def _gone(self) -> str:
        self._proc.join(5)
        return f"The engine process stopped (exit code {self._proc.exitcode}); restart the server."


@dataclass
class RemoteSession(Tokenizing):
    """What the server needs of a Session, with the engine in its own process."""

    bundle: Bundle
    template: ChatTemplate | None
    engine: EngineClient

    @classmethod
    def start(cls, path: str | Path, open_session: Callable) -> "RemoteSession":
        """Read the bundle's manifest, tokenizer and chat template here (a missing or
        foreign bundle fails before any process starts), then start the engine process,
        which loads the bundle again and checks its hashes."""
        bundle = load_bundle(path, verify=False)
        template = chat_template(bundle)
        return cls(bundle, template, EngineProcess(open_session))

    @classmethod
    def attach(cls, path: str | Path, client: EngineClient) -> "RemoteSession":
        """The session of one of several HTTP processes: its line to an engine process
        started by the process that started it."""
        bundle = load_bundle(path, verify=False)
        return cls(bundle, chat_template(bundle), client)

    @property
    def limits(self) -> StepLimits:
        return self.engine.limits

    def background(self) -> EngineClient:
        return self.engine

    def close(self) -> None:
        self.engine.close()
