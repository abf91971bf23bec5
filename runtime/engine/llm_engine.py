"""The engine loop: requests in, tokens and text deltas out, one step at a time.

Each `step()` asks the scheduler for a plan, runs it on the model runner, samples one
token per sampling sequence with that sequence's own SamplerState (seeded, and kept
across preemptions), records the step with the scheduler, and turns new tokens into
text deltas. Stop strings are found in the detokenized text, as in the one-request
loop (runtime/generate.py), and streamed text holds back what may begin one.

Thread safety: `add_request` and `abort` may be called from other threads while
`step()` runs. The forward pass runs outside the lock; the scheduler is built for
requests that end while their step is in flight (postprocess skips them). An abort of a
request in the running forward pass waits for that pass to return: the runner reads the
page table that freeing the pages would clear (an abort mid-pass failed the whole batch).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..detokenize import TextStream
from ..errors import ArleError
from ..executor import Executor
from ..generate import GenerationResult, StopChecker, empty_state
from ..sampler import SamplerState, SamplingParams, argmax_rows, plain_greedy, sample
from .kv_pages import PAGE_SIZE, PageManager
from .lookahead import DeviceGreedy, InFlight
from .model_runner import ModelRunner, pool_pages
from .scheduler import Scheduler, SchedulerConfig, StepPlan
from .sequence import Sequence

log = logging.getLogger("arle.engine")


def prefill_token_budget(executor) -> int:
    """Prefill tokens one step may feed by default: the bundle's prefill chunk, or what the
    executor asks for (cuda: several chunks, since its prompts share a program call)."""
    return max(executor.limits.max_prefill_tokens, getattr(executor, "prefill_token_budget", 0))


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; None means "from the bundle" (its max_batch, its context)."""

    max_batch: int | None = None  # running sequences; decode calls are split at the executor's max_batch
    max_num_batched_tokens: int | None = None  # default: max_batch + the executor's prefill_token_budget
    kv_pages: int | None = None  # KV pool size in pages of 16 positions; default from kv_memory_bytes
    kv_memory_bytes: int | None = None  # budget for the default pool size (1 GiB when None)
    prefix_cache: bool = True
    max_waiting: int = 1024
    # Queue the next decode step before reading the last one's tokens (engine/lookahead.py):
    # None = wherever the executor can (cuda), unless ARLE_LOOKAHEAD=0.
    lookahead: bool | None = None


@dataclass
class Completion(GenerationResult):
    """A finished request: GenerationResult (what `arle-runtime run` reports) plus engine facts."""

    request_id: int = -1
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    preemptions: int = 0
    error: str | None = None


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 us more per token to build
class RequestOutput:
    """What one request did in one step (read-only by convention). `token` is None when
    the step ended it without a new token (a stop token, an abort, an error); `text` is
    the new, safe-to-show text."""

    request_id: int
    token: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: str | None = None
    result: Completion | None = None  # on the final output


@dataclass
class _Request:
    seq: Sequence
    stream: TextStream
    checker: StopChecker
    arrival: float
    shown: int = 0  # characters of stream text already handed out
    stop_text: str | None = None  # the text cut at a stop string, once one matched
    first_token: float | None = None
    cached_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, executor: Executor, tokenizer, eos_token_ids=(), config: EngineConfig = EngineConfig()):
        limits = executor.limits
        self.executor = executor
        self.tokenizer = tokenizer
        self.config = config
        max_batch = config.max_batch or limits.max_batch
        # A hybrid model's linear-attention state: one slot per running sequence (no prefix cache).
        state_slots = max_batch if empty_state(executor, 1) else 0
        if state_slots and config.prefix_cache:
            log.info("prefix cache off: a hybrid model's linear-attention state cannot be rebuilt from cached pages")
        pages = PageManager(
            pool_pages(executor, PAGE_SIZE, config.kv_pages, config.kv_memory_bytes), prefix_cache=config.prefix_cache,
            state_slots=state_slots,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=config.max_num_batched_tokens or max_batch + prefill_token_budget(executor),
                max_batch=max_batch,
                max_prefill_chunk=limits.max_prefill_tokens,
                max_context=limits.max_context,
                max_waiting=config.max_waiting,
                eos_token_ids=tuple(eos_token_ids),
            ),
            pages,
        )
        # A tensor-parallel executor brings a runner that also drives its worker ranks.
        self.runner = getattr(executor, "runner_class", ModelRunner)(executor, pages)
        lookahead = config.lookahead
        if lookahead is None:
            lookahead = os.environ.get("ARLE_LOOKAHEAD", "1") != "0"
        capable = lookahead and getattr(executor, "lookahead_capable", False)
        self._greedy = DeviceGreedy(executor, max_batch) if capable else None
        # ARLE_LOOKAHEAD=decodes: steps planned ahead carry decodes only (a waiting prompt
        # drains the pipeline first, as before 2026-12-08; for comparisons)
        self._admit_ahead = os.environ.get("ARLE_LOOKAHEAD", "1") != "decodes"
        self._inflight: InFlight | None = None  # a launched step whose tokens are not read yet
        self._requests: dict[int, _Request] = {}
        self._pending: list[RequestOutput] = []  # finals of aborts, handed out by the next step
        self._in_flight: set[int] = set()  # requests of the forward pass running now
        self._deferred_aborts: list[int] = []  # aborts of those, applied when the pass returns
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._stepping = threading.Lock()

    # --- requests ----------------------------------------------------------------------

    def new_request_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: int | None = None) -> int:
        """Queue a request; raises ArleError for a prompt that cannot run, QueueFullError when busy."""
        with self._lock:
            rid = next(self._ids) if request_id is None else request_id
            if rid in self._requests:
                raise ValueError(f"request id {rid} is already live")
            seq = Sequence(prompt_ids, params, seq_id=rid)
            self.scheduler.add(seq)
            self._requests[rid] = _Request(seq, TextStream(self.tokenizer), StopChecker(params.stop), time.perf_counter())
            return rid

    def abort(self, request_id: int) -> bool:
        """End a request now (its pages are freed; if a forward pass is using them, as soon
        as it returns); its final output (finish_reason "abort") comes with the next step
        (or the running one). False when it is unknown or already done."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or request_id in self._deferred_aborts:
                return False
            if request_id in self._in_flight:
                self._deferred_aborts.append(request_id)
                return True
            self.scheduler.abort(request_id)
            self._pending.append(self._final(req))
            return True

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every live request with an error (the loop hit a bug); returns their finals."""
        with self._lock:
            outputs, self._pending = self._pending, []
            return outputs + self._fail(list(self._requests), message)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending) or self._inflight is not None

    @property
    def num_live(self) -> int:
        return len(self._requests)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self.scheduler.stats(), "kv_pool_bytes": self.runner.pool_bytes}

    # --- the loop ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return what each touched request did. A failure in the forward
        pass or in sampling ends that step's requests with finish_reason "error"."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("Engine.step() was called from two threads at once")
        try:
            with self._lock:
                outputs, self._pending = self._pending, []
            if self._inflight is not None:
                return outputs + self._step_ahead()
            with self._lock:
                if not self.scheduler.has_work:
                    return outputs
                plan = self.scheduler.schedule()
                outputs += [self._final(self._requests[seq.seq_id]) for seq in plan.finished]
                ids = [s.seq_id for s in plan.decodes] + [c.seq.seq_id for c in plan.prefills]
                self._in_flight = set(ids)
            if plan.is_empty:
                return outputs
            try:
                try:
                    logits = self.runner.run(plan)
                finally:
                    with self._lock:
                        outputs += self._apply_deferred_aborts()
                with self._lock:
                    greedy = plan.sampling and all(plain_greedy(seq.params) for seq in plan.sampling)
                    if self._greedy is not None and greedy:
                        self._inflight = self._launch_greedy(plan, logits)
                        self.scheduler.advance(plan)  # PENDING tokens until _step_ahead reads them
                        return outputs  # its tokens come with the next step
                    sampled = self._sample(plan, logits)
            except Exception as e:  # noqa: BLE001 - any failure ends these requests, not the loop
                return outputs + self._fail_step(ids, e, len(plan.sampling))
            with self._lock:
                tokens = [token for token, _ in sampled]
                logprobs = {seq.seq_id: lp for seq, (_, lp) in zip(plan.sampling, sampled)}
                for out in self.scheduler.postprocess(plan, tokens):
                    if out.seq.seq_id in self._requests:  # a finished-by-schedule one has had its final
                        outputs.append(self._emit(out.seq, out.token, logprobs.get(out.seq.seq_id)))
            return outputs
        finally:
            self._stepping.release()

    def _fail_step(self, ids: list[int], e: Exception, count: int) -> list[RequestOutput]:
        message = e.message if isinstance(e, ArleError) else f"internal error in the engine step: {e!r}"
        if not isinstance(e, ArleError):
            log.exception("engine step failed; ending its %d requests", count)
        with self._lock:
            return self._fail(ids, message)

    def _launch_greedy(self, plan: StepPlan, logits) -> InFlight:
        """Greedy tokens stay on the device as the next step's input (and go to the host
        without a wait); _emit's bookkeeping needs each sequence's sampler state."""
        for seq in plan.sampling:
            if seq.sampler_state is None:
                seq.sampler_state = SamplerState.create(seq.params, seq.prompt_ids, self.executor.device)
        return self._greedy.launch(plan, logits)

    def _step_ahead(self) -> list[RequestOutput]:
        """With a step in flight: queue the next step (its decodes' tokens fed from the
        device, greedy prompts admitted alongside), then read and hand out the step before
        it. When the next step cannot be planned ahead (a sampled prompt waits, pages run
        short), only read; the following step() schedules normally."""
        prev, self._inflight = self._inflight, None
        outputs: list[RequestOutput] = []
        nxt = None
        with self._lock:
            plan = self.scheduler.schedule_lookahead(
                eligible=lambda seq: self._admit_ahead and plain_greedy(seq.params))
            if plan is not None:
                self._in_flight = {seq.seq_id for seq in plan.decodes} | {c.seq.seq_id for c in plan.prefills}
        if plan is not None:
            try:
                try:
                    logits = self.runner.run(plan, feed=[prev.rows[seq.seq_id] for seq in plan.decodes])
                finally:
                    with self._lock:
                        outputs += self._apply_deferred_aborts()
                nxt = self._launch_greedy(plan, logits)
            except Exception as e:  # noqa: BLE001 - ends these requests (prev's tokens are still read below)
                outputs += self._fail_step([seq.seq_id for seq in plan.decodes], e, len(plan.decodes))
        try:
            tokens = prev.tokens()  # waits for prev's copy only: the step queued above keeps running
        except Exception as e:  # noqa: BLE001
            return outputs + self._fail_step([seq.seq_id for seq in prev.plan.sampling], e, len(prev.plan.sampling))
        with self._lock:
            for out in self.scheduler.resolve(prev.plan, tokens):
                if out.seq.seq_id in self._requests:
                    outputs.append(self._emit(out.seq, out.token, None))
            if nxt is not None:
                self.scheduler.advance(plan)
                self._inflight = nxt
        return outputs

    def _apply_deferred_aborts(self) -> list[RequestOutput]:
        """The forward pass returned: end the requests aborted while it ran (postprocess skips them)."""
        aborted, self._deferred_aborts, self._in_flight = self._deferred_aborts, [], set()
        outputs = []
        for rid in aborted:
            req = self._requests.get(rid)
            if req is not None:
                self.scheduler.abort(rid)
                outputs.append(self._final(req))
        return outputs

    def _sample(self, plan: StepPlan, logits) -> list[tuple[int, object]]:
        seqs = plan.sampling
        if not seqs:
            return []
        greedy = [i for i, seq in enumerate(seqs) if plain_greedy(seq.params)]
        if len(greedy) == len(seqs):  # the common case: one argmax over the batch, no row copies
            fast = dict(enumerate(argmax_rows(logits)))
        else:
            fast = dict(zip(greedy, argmax_rows(logits[greedy]))) if greedy else {}
        sampled = []
        for i, seq in enumerate(seqs):
            if seq.is_finished:  # aborted while the step ran; postprocess skips it
                sampled.append((0, None))
                continue
            if seq.sampler_state is None:
                seq.sampler_state = SamplerState.create(seq.params, seq.prompt_ids, self.executor.device)
            sampled.append((fast[i], None) if i in fast else sample(logits[i], seq.sampler_state))
        return sampled

    def _emit(self, seq: Sequence, token: int | None, lp) -> RequestOutput:
        req = self._requests[seq.seq_id]
        if req.first_token is None:
            req.first_token = time.perf_counter()
            req.cached_tokens = seq.num_cached_tokens
        if token is None:
            return self._final(req)
        seq.sampler_state.observe(token)
        logprob, top = None, ()
        if lp is not None:
            logprob = float(lp[token])
            req.logprobs.append(logprob)
            if seq.params.logprobs:
                values, ids = lp.topk(seq.params.logprobs)
                top = tuple(zip(ids.tolist(), values.tolist()))
        delta = req.stream.push(token)
        if req.checker.stop:
            self._check_stop(req)
        if seq.is_finished:  # the final output carries what is not shown yet
            return self._final(req, token, logprob, top)
        if req.checker.stop:  # hold back as much as may begin a stop string
            safe = len(req.stream.emitted) - req.checker.hold
            delta = req.stream.emitted[req.shown : safe] if safe > req.shown else ""
            req.shown = max(req.shown, safe)
        else:  # every new character is safe to show
            req.shown += len(delta)
        return RequestOutput(seq.seq_id, token, delta, logprob=logprob, top_logprobs=top)

    def _check_stop(self, req: _Request) -> None:
        """A stop string in the text cuts it there and ends the request."""
        seq, text = req.seq, req.stream.emitted
        cut = req.checker.find(text)
        if cut is None:
            return
        req.stop_text = text[:cut]
        if seq.is_finished:  # max_tokens ended it in the same step; the stop string wins
            seq.finish_reason = "stop"
        else:
            self.scheduler.finish(seq.seq_id, "stop")

    def _final(self, req: _Request, token=None, logprob=None, top=(), error: str | None = None) -> RequestOutput:
        seq = req.seq
        del self._requests[seq.seq_id]
        text = req.stop_text if req.stop_text is not None else req.stream.text
        delta = text[req.shown :] if len(text) > req.shown else ""
        now = time.perf_counter()
        result = Completion(
            text=text,
            token_ids=seq.output_ids,
            prompt_tokens=seq.num_prompt_tokens,
            finish_reason=seq.finish_reason,
            ttft_s=(req.first_token or now) - req.arrival,
            total_s=now - req.arrival,
            logprobs=req.logprobs,
            request_id=seq.seq_id,
            cached_tokens=req.cached_tokens,
            preemptions=seq.num_preemptions,
            error=error,
        )
        return RequestOutput(seq.seq_id, token, delta, True, seq.finish_reason, logprob, top, error, result)

    def _fail(self, ids: list[int], message: str) -> list[RequestOutput]:
        outputs = []
        for rid in ids:
            req = self._requests.get(rid)
            if req is not None:
                self.scheduler.finish(rid, "error")
                outputs.append(self._final(req, error=message))
        return outputs

    # --- convenience -------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
    ) -> list[Completion]:
        """Run the prompts together to completion (driving step() here); results in prompt order."""
        per = params if isinstance(params, list) else [params] * len(prompts)
        ids: list[int] = []
        try:
            for prompt, p in zip(prompts, per, strict=True):
                ids.append(self.add_request(prompt, p))
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        results: dict[int, Completion] = {}
        wanted = set(ids)
        while wanted - results.keys():
            if not self.has_work:
                raise RuntimeError("requests vanished: another thread is stepping this engine")
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out.result
        return [results[rid] for rid in ids]
