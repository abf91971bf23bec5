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

Messages, server -> engine: ("submit", rid, prompt_ids, params), ("cancel", rid),
("stats", key), ("close",). Engine -> server: ("ready", limits), ("failed", error),
("ack", rid, error or None), ("stats", key, dict), ("out", [RequestOutput, ...]).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import signal
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


def _engine_main(conn, open_session: Callable) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the server's process decides
    # when the engine stops (it cancels live requests first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()

    def send(message) -> None:
        try:
            with lock:
                conn.send(message)
        except OSError:  # the server's process is gone; the loop below sees EOF and exits
            pass

    try:
        session = open_session()
        engine = BackgroundEngine(session.engine, deliver=lambda outputs: send(("out", outputs)))
    except ArleError as e:
        send(("failed", e))
        return
    except Exception as e:  # noqa: BLE001 - reported to the server's process as one sentence
        log.exception("the engine could not start")
        send(("failed", ArleError(f"The engine could not start: {e!r}.")))
        return
    send(("ready", session.limits))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the server's process is gone
                break
            kind = message[0]
            if kind == "submit":
                _, rid, prompt_ids, params = message
                try:
                    engine.enqueue(prompt_ids, params, rid)
                    error = None
                except ArleError as e:
                    error = e
                except Exception as e:  # noqa: BLE001 - the request fails, the engine carries on
                    log.exception("could not queue request %d", rid)
                    error = ArleError(f"internal error queueing the request: {e!r}")
                send(("ack", rid, error))
            elif kind == "cancel":
                engine.cancel(message[1])
            elif kind == "stats":
                send(("stats", message[1], session.engine.stats()))
            elif kind == "close":
                break
    finally:
        engine.close()
        session.close()


# --- the server's side ----------------------------------------------------------------------


class EngineProcess:
    """The engine child, seen from the server's process."""

    def __init__(self, open_session: Callable):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_main, args=(child_conn, open_session), name="arle-engine",
                                 daemon=True)
        self._proc.start()
        child_conn.close()
        try:
            self.limits: StepLimits = self._wait_ready()
        except BaseException:
            self._stop(timeout=5)
            raise
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[int, RequestStream] = {}
        self._replies: dict[tuple, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._keys = itertools.count(1)
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read, name="arle-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> StepLimits:
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise ArleError(f"The engine process exited while loading the bundle (exit code {self._proc.exitcode}); "
                            "its log is above.") from None
        if message[0] == "failed":
            self._proc.join(10)
            raise message[1]
        return message[1]

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.is_alive()

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
        """Stop the engine; requests still live end with an error."""
        if self._proc.is_alive():
            with contextlib.suppress(ArleError):  # it died meanwhile
                self._send(("close",))
        self._stop(timeout)

    # the pipe
    def _check_alive(self) -> None:
        if not self.alive:
            raise ArleError(self._dead or "The engine process has stopped; restart the server.", code=STOPPED)

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the child is gone; the reader thread ends what was live
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
                    self._dispatch(message[1])
                else:  # ("ack", rid, error) or ("stats", key, dict)
                    with self._lock:
                        reply = self._replies.pop(message[:2], None)
                    if reply is not None:
                        with contextlib.suppress(concurrent.futures.InvalidStateError):  # its asker gave up
                            reply.set_result(message[2])
        except (EOFError, OSError):
            pass
        finally:
            self._proc.join(5)
            self._end_all(f"The engine process stopped (exit code {self._proc.exitcode}); restart the server.")

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

    def _stop(self, timeout: float) -> None:
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()


@dataclass
class RemoteSession(Tokenizing):
    """What the server needs of a Session, with the engine in its own process."""

    bundle: Bundle
    template: ChatTemplate | None
    engine: EngineProcess

    @classmethod
    def start(cls, path: str | Path, open_session: Callable) -> "RemoteSession":
        """Read the bundle's manifest, tokenizer and chat template here (a missing or
        foreign bundle fails before any process starts), then start the engine process,
        which loads the bundle again and checks its hashes."""
        bundle = load_bundle(path, verify=False)
        template = chat_template(bundle)
        return cls(bundle, template, EngineProcess(open_session))

    @property
    def limits(self) -> StepLimits:
        return self.engine.limits

    def background(self) -> EngineProcess:
        return self.engine

    def close(self) -> None:
        self.engine.close()
