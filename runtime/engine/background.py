"""The engine on its own thread, for the server and anything else with several callers.

`submit()` queues a request and returns a RequestStream at once; the loop thread steps
the engine while there is work and hands each output to its request's stream. A stream
is consumed with `for out in stream` from a thread, or `async for out in stream` when
it was submitted from inside a running asyncio loop (outputs then arrive through
`loop.call_soon_threadsafe`, so no thread waits per request). Errors in a step end that
step's requests with finish_reason "error"; anything else that escapes a step ends
every live request the same way. Nothing fails silently: the loop logs and carries on,
and if the thread ever stops, every open stream gets a final error output.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from ..errors import ArleError
from ..sampler import SamplingParams
from .llm_engine import Completion, Engine, RequestOutput

log = logging.getLogger("arle.engine")
STOPPED = "engine_stopped"  # the error code of a request refused because the engine is gone (HTTP 503)


class RequestStream:
    """The outputs of one request, ending with the one whose `finished` is true."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()

    def put(self, out: RequestOutput) -> None:
        """Called by the engine thread. Raises RuntimeError when the consumer's loop is closed."""
        if self._loop is None:
            self._queue.put(out)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def backlog(self) -> int:
        """Outputs delivered and not yet taken."""
        return self._queue.qsize()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was submitted from an asyncio loop; use `async for`")
        while True:
            out = self._queue.get()
            yield out
            if out.finished:
                return

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this stream was submitted outside an asyncio loop; use `for`")
        while True:
            out = await self._queue.get()
            yield out
            if out.finished:
                return

    def result(self) -> Completion:
        """Wait for the end (thread consumers); raise ArleError if the request failed."""
        for out in self:
            if out.finished:
                if out.error:
                    raise ArleError(out.error)
                return out.result
        raise AssertionError("unreachable")


class BackgroundEngine:
    """`deliver`, when given, receives every step's outputs instead of per-request streams
    (the engine process forwards them to the server's process; runtime/engine_process.py)."""

    def __init__(self, engine: Engine, deliver: Callable[[list[RequestOutput]], None] | None = None):
        self.engine = engine
        self._sink = deliver
        self._streams: dict[int, RequestStream] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="arle-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request. Raises ArleError (bad prompt, queue full, engine stopped) here,
        in the caller, so a server can answer 400/429 before it starts streaming."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        rid = self.engine.new_request_id()
        stream = RequestStream(rid, loop)
        with self._cond:
            self._streams[rid] = stream
        try:
            self.enqueue(prompt_ids, params, rid)
        except BaseException:
            with self._cond:
                self._streams.pop(rid, None)
            raise
        return stream

    async def submit_async(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """submit() for the server, which also drives an engine in another process (there
        the check of the request takes a round trip)."""
        return self.submit(prompt_ids, params)

    def enqueue(self, prompt_ids: list[int], params: SamplingParams, request_id: int) -> None:
        """Queue a request whose outputs go to a stream or the `deliver` callback; wakes the loop."""
        if not self.alive:
            raise ArleError("The engine has stopped; restart the server.", code=STOPPED)
        self.engine.add_request(prompt_ids, params, request_id=request_id)
        with self._cond:
            self._cond.notify()

    async def stats_async(self) -> dict:
        return self.engine.stats()

    def cancel(self, request_id: int) -> bool:
        """Abort a request (the client went away); its stream ends with finish_reason "abort"."""
        done = self.engine.abort(request_id)
        with self._cond:
            self._cond.notify()
        return done

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; requests still live end with an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the loop thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.engine.has_work:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - a bug in one step must not end the server
                    log.exception("engine step raised; ending all live requests")
                    outputs = self.engine.fail_all(f"internal error in the engine: {e!r}")
                self._deliver(outputs)
        finally:
            with self._cond:
                self._stopping = True
            try:
                outputs = self.engine.fail_all("The engine stopped before this request finished.")
            except Exception:  # noqa: BLE001 - still close the streams below
                log.exception("could not end the live requests cleanly")
                outputs = []
            self._deliver(outputs)
            with self._cond:
                orphans, self._streams = list(self._streams.values()), {}
            for stream in orphans:
                self._put(stream, RequestOutput(stream.request_id, None, "", True, "error",
                                                error="The engine stopped before this request finished."))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per asyncio loop per step
        (call_soon_threadsafe writes to the loop's self-pipe; at 64 streams one call per
        output cost 64 syscalls and 64 loop wake-ups a step)."""
        if self._sink is not None:
            if outputs:
                self._sink(outputs)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._cond:
            for out in outputs:
                stream = self._streams.pop(out.request_id) if out.finished else self._streams.get(out.request_id)
                if stream is None:
                    continue
                if stream._loop is None:
                    stream.put(out)
                else:
                    by_loop.setdefault(stream._loop, []).append((stream, out))
        wake_loops(by_loop, self.engine.abort)

    def _put(self, stream: RequestStream, out: RequestOutput) -> None:
        try:
            stream.put(out)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            if not out.finished:
                self.engine.abort(out.request_id)


def wake_loops(by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]],
               abort: Callable[[int], object]) -> None:
    """Queue each event loop's outputs with one call_soon_threadsafe; `abort` the live
    requests of a loop that has closed (nobody is listening)."""
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            for _, out in items:
                if not out.finished:
                    abort(out.request_id)


def _put_all(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    """On the consumers' loop: queue each output on its stream."""
    for stream, out in items:
        stream._queue.put_nowait(out)
