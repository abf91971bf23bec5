"""`arle-runtime serve`: an OpenAI-compatible HTTP server over one Session (starlette + uvicorn).

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON or SSE streaming),
GET /v1/models, GET /healthz (the process answers), GET /readyz (200 once the engine
is loaded and one warm-up generation ran), GET /metrics (Prometheus text).

Every generation goes through the session's engine: under `arle-runtime serve` a process
of its own (runtime/engine_process.py: the HTTP layer and the engine loop then do not
share a GIL), elsewhere (Ray replicas, tests) a BackgroundEngine thread in this process.
Handlers consume request streams with `async for`, so the event loop never blocks on it.
A client that goes away cancels its request; a per-request timeout bounds every one.
Chat requests with `tools` get `tool_calls` back, parsed from the model's Qwen/Hermes
<tool_call> blocks (runtime/tool_calls.py), streamed as soon as each call is complete.
Errors are OpenAI error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine.background import STOPPED
from .engine.scheduler import QueueFullError
from .errors import ArleError
from .sampler import SamplingParams
from .tool_calls import ToolCallStream, parse_tool_calls, validate_message_tool_fields, validate_tool_choice, validate_tools

log = logging.getLogger("arle.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics")


class HTTPError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _from_arle(e: ArleError) -> HTTPError:
    if isinstance(e, QueueFullError):
        return HTTPError(429, e.message, "rate_limit_error", e.param, e.code or "queue_full")
    if e.code == STOPPED:
        return HTTPError(503, e.message, "server_error", e.param, e.code)
    return HTTPError(400, e.message, "invalid_request_error", e.param, e.code)


class Metrics:
    """The server's Prometheus metrics. Request, token and latency figures are counted
    where the request is served; the engine's (queue, running, KV pages, prefix cache)
    are read from the engine when /metrics is scraped. Under `serve --http-processes N`
    each HTTP process counts into prometheus-client's multiprocess files
    ($PROMETHEUS_MULTIPROC_DIR, set by the process that started them) and a scrape of
    any of them sums all of them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("arle_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("arle_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.completion_tokens = Counter("arle_completion_tokens", "Generated tokens.", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("arle_time_to_first_token_seconds", "Arrival to first token.", buckets=buckets, registry=r)
        self.itl = Histogram("arle_inter_token_latency_seconds", "Time between tokens.", buckets=buckets, registry=r)
        self.e2e = Histogram("arle_e2e_request_latency_seconds", "Arrival to last token.", buckets=buckets, registry=r)
        self.cancelled = Counter("arle_requests_cancelled", "Requests ended early: client gone, timeout or shutdown.",
                                 registry=r)
        self.engine_stats = _EngineStats()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client.multiprocess import MultiProcessCollector

            self.scraped = CollectorRegistry()
            MultiProcessCollector(self.scraped)
        else:
            self.scraped = r
        self.scraped.register(self.engine_stats)

    def render(self, stats: dict | None) -> bytes:
        """The Prometheus text; `stats` is the engine's stats() (None: the last ones seen)."""
        if stats is not None:
            self.engine_stats.stats = stats
        return generate_latest(self.scraped)


class _EngineStats:
    """A Prometheus collector over the engine's stats() dict, read at scrape time."""

    GAUGES = (("arle_queue_depth", "Requests waiting for the engine.", "requests_waiting"),
              ("arle_requests_running", "Requests the engine is running.", "requests_running"),
              ("arle_kv_pages_in_use", "KV cache pages in use.", "kv_pages_in_use"),
              ("arle_kv_pages_total", "KV cache pages in the pool.", "kv_pages_total"))
    # the engine's running totals (counters: a scrape reads them, nothing adds to them here)
    TOTALS = (("arle_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache.", "prefix_hit_tokens"),
              ("arle_prefix_cache_lookup_tokens", "Prompt tokens looked up in the prefix cache.",
               "prefix_lookup_tokens"))

    def __init__(self) -> None:
        self.stats: dict = {}

    def collect(self):
        stats = self.stats
        for name, doc, key in self.GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        looked = stats.get("prefix_lookup_tokens", 0)
        yield GaugeMetricFamily("arle_prefix_cache_hit_rate", "Prompt tokens served by the prefix cache / looked up.",
                                value=stats.get("prefix_hit_tokens", 0) / looked if looked else 0.0)
        for name, doc, key in self.TOTALS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))


# --- request parsing -------------------------------------------------------------------

_MISSING = object()


def _field(body: dict, name: str, types, default=_MISSING, what: str | None = None):
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise HTTPError(400, f"'{name}' is required.", param=name, code="missing_required_parameter")
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        raise HTTPError(400, f"'{name}' must be {what or _type_name(types)}, got {json.dumps(value)[:80]}.",
                        param=name, code="invalid_type")
    return value


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _sampling(body: dict, prompt_len: int, max_context: int, logprobs: int | None) -> SamplingParams:
    num = (int, float)
    max_tokens = _field(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, None)
    if max_tokens is None:
        max_tokens = max(1, max_context - prompt_len)
    n = _field(body, "n", int, 1)
    if n != 1:
        raise HTTPError(400, "Only n=1 is supported.", param="n", code="unsupported_value")
    stop = _field(body, "stop", (str, list), (), "a string or a list of strings")
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise HTTPError(400, "'stop' must be a non-empty string or a list of up to 16 of them.", param="stop")
    top_k = _field(body, "top_k", int, 0)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_field(body, "temperature", num, 1.0)),
            top_p=float(_field(body, "top_p", num, 1.0)),
            top_k=0 if top_k == -1 else top_k,  # -1 means off (vLLM's spelling)
            min_p=float(_field(body, "min_p", num, 0.0)),
            repetition_penalty=float(_field(body, "repetition_penalty", num, 1.0)),
            frequency_penalty=float(_field(body, "frequency_penalty", num, 0.0)),
            presence_penalty=float(_field(body, "presence_penalty", num, 0.0)),
            seed=_field(body, "seed", int, None),
            stop=tuple(stop),
            logprobs=logprobs,
        )
    except ArleError as e:
        raise _from_arle(e) from None


def _messages(body: dict) -> list[dict]:
    messages = _field(body, "messages", list)
    if not messages:
        raise HTTPError(400, "'messages' must not be empty.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HTTPError(400, f"messages[{i}] must be an object with a string 'role'.", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise HTTPError(400, f"messages[{i}].content: only text parts are supported.",
                                    param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is not None and not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}].content must be a string or a list of text parts.",
                            param=f"messages[{i}].content")
        try:
            validate_message_tool_fields(m, f"messages[{i}]")
        except ArleError as e:
            raise _from_arle(e) from None
        out.append({**m, "content": content or ""})
    return out


@dataclass
class _Job:
    kind: str  # "chat" | "completion"
    id: str
    created: int
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    arrival: float
    parse_tools: bool = False  # the answer's <tool_call> blocks become tool_calls
    parallel_tool_calls: bool = True  # False: only the first call is returned


# --- the app ---------------------------------------------------------------------------


class ServerState:
    def __init__(self, session, api_key: str | None, request_timeout: float, max_body: int):
        self.session = session
        self.model = session.bundle.name
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.max_body = max_body
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self.live: set[int] = set()
        self.engine = None
        self._warmup: asyncio.Task | None = None

    # lifecycle
    async def startup(self) -> None:
        self.engine = self.session.background()
        self._warmup = asyncio.create_task(self._warm())

    async def _warm(self) -> None:
        try:
            ids = self.session.encode("Hello") or [0]
            stream = await self.engine.submit_async(ids, SamplingParams(max_tokens=1, temperature=0.0))
            async for out in stream:
                if out.finished and out.error:
                    raise ArleError(out.error)
            self.ready = True
            log.info("arle: %s is ready", self.model)
        except Exception:  # noqa: BLE001 - stay unready; /readyz says so
            log.exception("warm-up generation failed; the server stays unready")

    async def warmed(self) -> bool:
        """Wait for the warm-up generation (Ray replicas start only once it ran); True if ready."""
        if self._warmup is not None:
            await self._warmup
        return self.ready

    def begin_shutdown(self) -> None:
        """Stop taking requests and end the live ones (they finish with "abort")."""
        self.draining = True
        self.ready = False
        if self.engine is not None:
            for rid in list(self.live):
                self.engine.cancel(rid)

    async def shutdown(self) -> None:
        self.begin_shutdown()
        if self._warmup is not None:
            self._warmup.cancel()
        await asyncio.to_thread(self.session.close)

    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise HTTPError(401, "Missing or wrong API key; send 'Authorization: Bearer KEY'.",
                            "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise HTTPError(413, f"The request body is over {self.max_body} bytes.", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise HTTPError(413, f"The request body is over {self.max_body} bytes.", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"The request body is not valid JSON: {e}.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def parse(self, body: dict, kind: str) -> _Job:
        model = _field(body, "model", str)
        if model != self.model:
            raise HTTPError(404, f"The model '{model}' does not exist; this server has '{self.model}'.",
                            param="model", code="model_not_found")
        stream = _field(body, "stream", bool, False)
        opts = _field(body, "stream_options", dict, {})
        include_usage = bool(opts.get("include_usage", False)) if stream else False
        parse_tools, parallel = False, True
        try:
            if kind == "chat":
                tools = validate_tools(body.get("tools"))
                choice = validate_tool_choice(body.get("tool_choice"), tools)
                parallel = _field(body, "parallel_tool_calls", bool, True)
                shown = choice.tools_to_show(tools)
                parse_tools = bool(shown)
                prompt_ids = self.session.encode_chat(_messages(body), tools=shown or None)
                logprobs = None
                if _field(body, "logprobs", bool, False):
                    logprobs = _field(body, "top_logprobs", int, 0)
            else:
                prompt = _field(body, "prompt", (str, list), what="a string")
                if isinstance(prompt, list):
                    if len(prompt) != 1 or not isinstance(prompt[0], str):
                        raise HTTPError(400, "'prompt' must be one string.", param="prompt")
                    prompt = prompt[0]
                prompt_ids = self.session.encode(prompt)
                logprobs = _field(body, "logprobs", int, None)
        except ArleError as e:
            raise _from_arle(e) from None
        limits = self.session.limits
        params = _sampling(body, len(prompt_ids), limits.max_context, logprobs)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return _Job(kind, f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), self.model, prompt_ids, params,
                    stream, include_usage, time.perf_counter(), parse_tools, parallel)

    # pieces of answers
    def _token_text(self, token: int) -> str:
        return self.session.tokenizer.decode([token], skip_special_tokens=False)

    def _chat_logprob(self, out) -> dict:
        text = self._token_text(out.token)
        return {
            "token": text, "logprob": out.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp, "bytes": list(t.encode())}
                             for i, lp in out.top_logprobs],
        }

    def _usage(self, job: _Job, result) -> dict:
        completion = len(result.token_ids) if result is not None else 0
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(job.prompt_ids) + completion}
        if result is not None and result.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": result.cached_tokens}
        return usage

    def _observe_end(self, job: _Job, result) -> None:
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        if result is not None:
            self.metrics.completion_tokens.inc(len(result.token_ids))
        self.metrics.e2e.observe(time.perf_counter() - job.arrival)

    async def outputs(self, job: _Job, stream, request: Request):
        """The request's outputs, with metrics, the timeout, and cancel on disconnect/exit."""
        watcher = asyncio.create_task(self._watch_disconnect(request, stream.request_id))
        last, cancelled, finished = None, True, False  # cancelled until a final output that is not an abort
        try:
            async with asyncio.timeout(self.request_timeout):
                async for out in stream:
                    now = time.perf_counter()
                    if out.token is not None:
                        if last is None:
                            self.metrics.ttft.observe(now - job.arrival)
                        else:
                            self.metrics.itl.observe(now - last)
                        last = now
                    if out.finished:
                        cancelled, finished = out.finish_reason == "abort", True
                        self._observe_end(job, out.result)
                    yield out
        except TimeoutError:
            raise HTTPError(504, f"The request took longer than {self.request_timeout:g} s and was cancelled.",
                            "timeout_error", code="timeout") from None
        finally:
            watcher.cancel()
            if not finished:  # the client went away, the timeout fired, or the server stops
                self.engine.cancel(stream.request_id)
            self.live.discard(stream.request_id)
            if cancelled:
                self.metrics.cancelled.inc()

    async def _watch_disconnect(self, request: Request, rid: int) -> None:
        with contextlib.suppress(Exception):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    self.engine.cancel(rid)
                    return

    async def submit(self, job: _Job):
        if self.draining:
            raise HTTPError(503, "The server is shutting down.", "server_error", code="shutting_down")
        if not self.ready:
            raise HTTPError(503, "The server is still warming up; retry shortly.", "server_error", code="not_ready")
        try:
            stream = await self.engine.submit_async(job.prompt_ids, job.params)
        except ArleError as e:
            raise _from_arle(e) from None
        self.live.add(stream.request_id)
        return stream

    async def complete(self, job: _Job, request: Request) -> JSONResponse:
        stream = await self.submit(job)
        final, logprobs = None, []
        async for out in self.outputs(job, stream, request):
            if out.token is not None and job.params.logprobs is not None and out.logprob is not None:
                logprobs.append(out)
            if out.finished:
                final = out
        if final.error:
            raise HTTPError(500, final.error, "server_error", code="engine_error")
        result = final.result
        if job.kind == "chat":
            message, reason = {"role": "assistant", "content": result.text}, final.finish_reason
            if job.parse_tools:
                content, calls = parse_tool_calls(result.text)
                calls = calls if job.parallel_tool_calls else calls[:1]
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}
                    reason = _tool_finish(reason)
            choice = {"index": 0, "message": message,
                      "logprobs": {"content": [self._chat_logprob(o) for o in logprobs]} if job.params.logprobs is not None else None,
                      "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "logprobs": self._completion_logprobs(logprobs, job),
                      "finish_reason": final.finish_reason}
            obj = "text_completion"
        return JSONResponse({"id": job.id, "object": obj, "created": job.created, "model": job.model,
                             "choices": [choice], "usage": self._usage(job, result)})

    def _completion_logprobs(self, outs, job: _Job):
        if job.params.logprobs is None:
            return None
        tokens = [self._token_text(o.token) for o in outs]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [o.logprob for o in outs],
                "top_logprobs": [{self._token_text(i): lp for i, lp in o.top_logprobs} for o in outs],
                "text_offset": offsets}

    async def stream_events(self, job: _Job, stream, request: Request):
        chat = job.kind == "chat"
        chunks = _Chunks(job)
        chunk = chunks.event
        result = None
        tools = ToolCallStream() if chat and job.parse_tools else None
        num_calls = 0
        try:
            if chat:
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            async for out in self.outputs(job, stream, request):
                if out.finished and out.error:
                    err = HTTPError(500, out.error, "server_error", code="engine_error")
                    yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'param': None, 'code': err.code}})}\n\n"
                    break
                want_lp = job.params.logprobs is not None and out.token is not None and out.logprob is not None
                if out.finished:
                    result = out.result
                if not chat:
                    if out.text and not (want_lp or out.finished):
                        yield chunks.text(out.text)
                    elif out.text or want_lp or out.finished:
                        yield chunk({"index": 0, "text": out.text,
                                     "logprobs": self._completion_logprobs([out], job) if want_lp else None,
                                     "finish_reason": out.finish_reason if out.finished else None})
                    continue
                text, calls = out.text, []
                if tools is not None:  # raw <tool_call> text never reaches the client
                    text, calls = tools.feed(out.text)
                    if out.finished:
                        text += tools.finish()[0]
                    if not job.parallel_tool_calls:
                        calls = calls[: max(0, 1 - num_calls)]
                reason = None
                if out.finished:
                    reason = _tool_finish(out.finish_reason) if num_calls + len(calls) else out.finish_reason
                if text and not (want_lp or out.finished):
                    yield chunks.text(text)
                elif text or want_lp or (out.finished and not calls):
                    yield chunk({"index": 0, "delta": {"content": text} if text else {},
                                 "logprobs": {"content": [self._chat_logprob(out)]} if want_lp else None,
                                 "finish_reason": None if calls else reason})
                for call in calls:
                    yield chunk({"index": 0, "delta": {"tool_calls": [{"index": num_calls, **call.to_openai()}]},
                                 "logprobs": None, "finish_reason": None})
                    num_calls += 1
                if out.finished and calls:
                    yield chunk({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
        except HTTPError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': e.param, 'code': e.code}})}\n\n"
        if job.include_usage:
            body = {"id": job.id, "object": chunks.object, "created": job.created, "model": job.model, "choices": [],
                    "usage": self._usage(job, result)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


class _Chunks:
    """A stream's SSE chunk events. All chunks of a stream share everything but the choice, so
    that part is encoded once; the commonest choice, plain text, is spliced in without a dict
    (json was ~18% of the server's event-loop time per token at 64 streams). The events are
    what json.dumps of the whole body gives."""

    def __init__(self, job: _Job):
        chat = job.kind == "chat"
        self.object = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps({"id": job.id, "object": self.object, "created": job.created, "model": job.model})[:-1]
        self.head = f'data: {head}, "choices": ['
        self.tail = '], "usage": null}\n\n' if job.include_usage else "]}\n\n"
        self.text_open = '{"index": 0, "delta": {"content": ' if chat else '{"index": 0, "text": '
        self.text_close = ('}' if chat else '') + ', "logprobs": null, "finish_reason": null}'

    def event(self, choice: dict) -> str:
        return self.head + json.dumps(choice) + self.tail

    def text(self, text: str) -> str:
        """The event of a choice with this text and nothing else (no logprobs, not the last)."""
        return self.head + self.text_open + json.dumps(text) + self.text_close + self.tail


async def _coalesce(events, stream):
    """The events of outputs that piled up while the server was busy, in one write: at 64 streams
    a write per token was the server's largest cost. An event never waits for a later output."""
    pending = []
    try:
        async for event in events:
            pending.append(event)
            if not stream.backlog():
                yield "".join(pending)
                pending.clear()
        if pending:
            yield "".join(pending)
    finally:  # closed early (the client left): end the request's stream now, not at garbage collection
        await events.aclose()


def _tool_finish(reason: str | None) -> str | None:
    """OpenAI's finish_reason for an answer that called tools (a cut-off one stays "length")."""
    return "tool_calls" if reason == "stop" else reason


def create_app(session, *, api_key: str | None = None, request_timeout: float = 600.0,
               max_body: int = MAX_BODY_BYTES) -> Starlette:
    state = ServerState(session, api_key, request_timeout, max_body)

    async def generate(request: Request, kind: str) -> Response:
        try:
            started = time.perf_counter()
            state.check_auth(request)
            job = state.parse(await state.read_json(request), kind)
            if job.stream:
                parsed = time.perf_counter()
                stream = await state.submit(job)
                # Where the time before the headers went (the body, parsing and tokenizing; the
                # engine's ack), for a client measuring its time to first token.
                timing = f"parse;dur={(parsed - started) * 1e3:.3f}, queue;dur={(time.perf_counter() - parsed) * 1e3:.3f}"
                return StreamingResponse(_coalesce(state.stream_events(job, stream, request), stream),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                  "Server-Timing": timing})
            return await state.complete(job, request)
        except HTTPError as e:
            return e.response()

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def models(request: Request) -> Response:
        try:
            state.check_auth(request)
        except HTTPError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": state.model, "object": "model", "created": 0, "owned_by": "arle"}]})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if state.ready and not state.draining and state.engine.alive:
            return JSONResponse({"status": "ready", "model": state.model})
        status = "draining" if state.draining else "loading" if not state.ready else "engine stopped"
        return JSONResponse({"status": status}, status_code=503)

    async def metrics(request: Request) -> Response:
        stats = None
        if state.engine is not None:
            with contextlib.suppress(ArleError):  # a stopped engine keeps its last figures
                stats = await state.engine.stats_async()
        return Response(state.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.arle = state
    return _CountRequests(app, state.metrics)


class _CountRequests:
    """ASGI middleware: arle_requests_total{endpoint, status}."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope.get("path", "")
        endpoint = endpoint if endpoint in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def serve(session, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          request_timeout: float = 600.0, log_level: str = "info", sock=None) -> None:
    """Run the server until SIGTERM / Ctrl-C: stop accepting, cancel live requests, close the
    engine. `sock`: a listening socket to accept on instead of binding host:port (several
    HTTP processes share one; runtime/http_processes.py)."""
    import uvicorn

    app = create_app(session, api_key=api_key, request_timeout=request_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5, access_log=False)
    server = _Server(config, app.state.arle)
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        session.close()
    if not server.started:
        raise ArleError(f"The server could not start on {host}:{port} (is the port in use?).")


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config, state: ServerState):
            super().__init__(config)
            self.arle_state = state

        async def shutdown(self, sockets=None):
            self.arle_state.begin_shutdown()  # end live streams first, so connections close quickly
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the captured signal after a graceful stop; the CLI's SIGTERM
            # handler would turn that into exit 130. A graceful stop is a clean exit.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return Server


def _Server(config, state):  # noqa: N802 - builds the uvicorn subclass lazily (uvicorn imports on use)
    return _uvicorn_server()(config, state)
