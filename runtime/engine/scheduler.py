"""Who runs in the next step, and with how many tokens.

First come, first served. Each step feeds at most `max_num_batched_tokens` tokens:
every running decode first (one token each, so inter-token latency stays flat while
long prompts arrive), then chunks of prompts already being prefilled, then newly
admitted prompts. A long prompt is split across steps and runs beside the decodes.

When a decode needs a page and none is left, the most recently arrived running
sequence is preempted: its pages are dropped (full ones stay in the prefix cache) and
it waits at the head of the queue to recompute prompt + output later. The earliest
sequence is never the victim, so it always progresses; a sequence is finished with
"length" once it would outgrow the whole pool, so nothing waits forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import ArleError
from ..generate import check_prompt
from .kv_pages import PageCopy, PageManager
from .sequence import Sequence, SequenceStatus


PENDING = -1  # a sampled token still on the device (Scheduler.advance / resolve)


class QueueFullError(ArleError):
    """Too many requests are waiting; the server answers 429/503 and the client retries."""

    def __init__(self, limit: int):
        super().__init__(
            f"The server is busy: {limit} requests are already waiting; retry shortly.", code="queue_full"
        )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # tokens fed in one step, decodes and prefill chunks together
    max_batch: int = 64  # sequences in one step; also the size of the running set
    max_prefill_chunk: int = 2048  # one sequence's prefill tokens in one step (the executor's max_prefill_tokens)
    max_context: int = 4096  # prompt + output tokens of one sequence
    max_waiting: int = 1024  # queued requests before add() refuses
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        checks = [
            (self.max_batch >= 1, "max_batch", "must be at least 1"),
            # Every running sequence gets its decode token each step, budget permitting.
            (self.max_num_batched_tokens >= self.max_batch, "max_num_batched_tokens", "must be at least max_batch"),
            (self.max_prefill_chunk >= 1, "max_prefill_chunk", "must be at least 1"),
            (self.max_context >= 2, "max_context", "must be at least 2"),
            (self.max_waiting >= 1, "max_waiting", "must be at least 1"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ArleError(f"Engine setting {name} {rule}, got {getattr(self, name)!r}.", param=name)


@dataclass(frozen=True)
class PrefillChunk:
    """Feed `seq.token_ids[start : start + length]` at positions start.. (start = tokens already computed)."""

    seq: Sequence
    start: int
    length: int

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.length]

    @property
    def samples(self) -> bool:
        """The last chunk of a prompt yields the next token; earlier chunks only fill the KV."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class StepPlan:
    """One step for the model runner: apply `copies`, run `decodes` (one token each, the
    sequence's last token at position num_tokens - 1) and `prefills`, then sample one
    token for each sequence in `sampling`, in that order."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    copies: list[PageCopy] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # informational (logs, metrics)
    finished: list[Sequence] = field(default_factory=list)  # finished by the scheduler itself

    frozen_sampling: list[Sequence] | None = None  # set by Scheduler.advance (PENDING tokens change `samples`)

    @property
    def sampling(self) -> list[Sequence]:
        if self.frozen_sampling is not None:
            return self.frozen_sampling
        return self.decodes + [c.seq for c in self.prefills if c.samples]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(frozen=True)
class StepOutput:
    """What one sequence did in a step: `token` was appended (None when the step ended it
    with a stop token, or it was finished without sampling)."""

    seq: Sequence
    token: int | None

    @property
    def finished(self) -> bool:
        return self.seq.is_finished


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: PageManager):
        self.config = config
        self.pages = pages
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live: dict[int, Sequence] = {}
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, int]:
        return {
            "requests_waiting": len(self.waiting),
            "requests_running": len(self.running),
            "preemptions": self.num_preemptions,
            **self.pages.stats(),
        }

    def add(self, seq: Sequence) -> None:
        """Queue a new request. Raises ArleError for a prompt that can never run and
        QueueFullError when the queue is at its limit."""
        assert seq.status is SequenceStatus.WAITING and seq.num_computed == 0, seq
        check_prompt(seq.prompt_ids, self.config.max_context)
        if seq.num_tokens > self.pages.capacity_tokens:
            raise ArleError(
                f"The prompt has {seq.num_tokens} tokens, but the KV cache holds {self.pages.capacity_tokens}; "
                "shorten it or give the cache more memory.",
                param="prompt",
                code="context_length_exceeded",
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(self.config.max_waiting)
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def schedule(self) -> StepPlan:
        """Plan the next step. This admits, preempts and allocates pages right away, so
        run the plan and hand it to postprocess() before scheduling again (if the
        forward pass fails, abort the plan's sequences)."""
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed == 1 and self._reserve(seq, 1, plan):
                plan.decodes.append(seq)
                budget -= 1
        for seq in sorted(self.running, key=lambda s: s.order):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed == 1:
                continue
            budget = self._next_chunk(seq, plan, budget)
        # After a preemption the pool is tight: admitting now would only evict again.
        while self.waiting and not plan.preempted and budget and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            copies = self.pages.try_admit(seq)
            if copies is None:
                if self.running:
                    break  # strict FCFS: later requests wait behind the head
                # Unreachable while add() and postprocess() keep sequences within the
                # pool; kept so that a bookkeeping slip ends one request, not the loop.
                self._finish(seq, "length")
                plan.finished.append(seq)
                continue
            budget = self._admit_head(copies, plan, budget)
        return plan

    def schedule_lookahead(self, eligible=lambda seq: True) -> StepPlan | None:
        """Plan the next step while the last step's tokens are still PENDING on the device:
        one decode per running sequence (except those that token ends by length), then,
        as schedule() does, prompt chunks of running sequences and admissions of waiting
        ones, whose tokens are known on the host. Every prompt in the plan must be
        `eligible` (the engine: plain greedy, so its token can stay on the device too).
        None when the step needs what this cannot give (a preemption, a prompt that is not
        eligible at the head of the queue, a decode of a token already read) or would
        sample nothing: then the engine reads the tokens first and schedules normally."""
        running = sorted(self.running, key=lambda s: s.order)
        decodes = [s for s in running if s.last_token == PENDING and not self.will_stop_on_length(s)]
        prompts = [s for s in running if s.last_token != PENDING]
        if any(s.num_uncomputed != 1 for s in decodes) or any(s.num_uncomputed < 2 for s in prompts):
            return None
        if not all(map(eligible, prompts)) or (self.waiting and not eligible(self.waiting[0])):
            return None  # strict FCFS: the normal path plans them (decided before any page moves)
        needed = sum(self.pages.pages_needed(s, s.num_computed + 1) for s in decodes)
        if not self.pages.can_allocate(needed):
            return None  # schedule() preempts
        plan = StepPlan(decodes=decodes)
        for seq in decodes:
            plan.copies += self.pages.prepare(seq, seq.num_computed + 1)
        budget = self.config.max_num_batched_tokens - len(decodes)
        for seq in prompts:
            if budget:
                budget = self._next_chunk(seq, plan, budget)
        while self.waiting and budget and len(self.running) < self.config.max_batch:
            if not eligible(self.waiting[0]):
                break  # a later arrival: the next schedule_lookahead returns None for it
            copies = self.pages.try_admit(self.waiting[0])
            if copies is None:
                break  # it waits for pages, as in schedule()
            budget = self._admit_head(copies, plan, budget)
        # A step that samples nothing (only a prompt's first chunks) leaves no token on the
        # device to read ahead of: plan it normally (what this admitted stays admitted).
        return plan if plan.sampling else None

    def postprocess(self, plan: StepPlan, sampled: list[int]) -> list[StepOutput]:
        """Record a finished step: `sampled[i]` is the token drawn for `plan.sampling[i]`.
        Sequences aborted while the step ran are skipped."""
        assert len(sampled) == len(plan.sampling), (len(sampled), len(plan.sampling))
        self.advance(plan)
        return self.resolve(plan, sampled)

    def advance(self, plan: StepPlan) -> None:
        """The first half of postprocess, for a step whose tokens are not known yet (the
        engine's lookahead): the step's K/V counts as computed and each sampling
        sequence gets PENDING as its next token, so the following step can be planned
        (its decodes read the tokens on the device). `resolve` fills the tokens in."""
        plan.frozen_sampling = plan.sampling
        for seq in plan.decodes:
            if not seq.is_finished:
                seq.num_computed += 1
        for chunk in plan.prefills:
            if not chunk.seq.is_finished:
                assert chunk.start == chunk.seq.num_computed, chunk
                chunk.seq.num_computed += chunk.length
        for seq in (*plan.decodes, *(c.seq for c in plan.prefills)):
            if not seq.is_finished:
                self.pages.publish(seq)  # pages of computed positions only: never a PENDING token
        for seq in plan.sampling:
            if not seq.is_finished:
                seq.append(PENDING)

    def resolve(self, plan: StepPlan, sampled: list[int]) -> list[StepOutput]:
        """The second half of postprocess: the step's tokens replace their PENDING
        placeholders (a stop token removes its own), and stop and length limits end
        sequences."""
        outputs = [StepOutput(seq, None) for seq in plan.finished]
        for seq, token in zip(plan.sampling, sampled):
            if seq.is_finished:
                continue
            assert seq.token_ids[-1] == PENDING, seq
            reason = self._stop_reason(seq, token)
            appended = None if reason == "stop" else token
            seq.token_ids.pop()
            if appended is not None:
                seq.append(token)
                reason = self._length_reason(seq)
            if reason:
                self._finish(seq, reason)
            outputs.append(StepOutput(seq, appended))
        return outputs

    def will_stop_on_length(self, seq: Sequence) -> bool:
        """Whether the token now PENDING ends `seq` by length (max_tokens, the context,
        the pool), whatever it turns out to be: the lookahead leaves it out."""
        return self._length_reason(seq) is not None

    def finish(self, seq_id: int, reason: str) -> Sequence | None:
        """End a request from outside (a stop string matched, the client went away);
        its pages are freed at once. Returns None for an unknown or finished id."""
        seq = self._live.get(seq_id)
        if seq is not None:
            self._finish(seq, reason)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        return self.finish(seq_id, "abort")

    # --- internals ---------------------------------------------------------------------

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.config.eos_token_ids):
            return "stop"
        return None

    def _length_reason(self, seq: Sequence) -> str | None:
        # The next step writes position num_tokens - 1; past the pool it could never run.
        if (
            seq.num_output_tokens >= seq.params.max_tokens
            or seq.num_tokens >= self.config.max_context
            or seq.num_tokens > self.pages.capacity_tokens
        ):
            return "length"
        return None

    def _next_chunk(self, seq: Sequence, plan: StepPlan, budget: int) -> int:
        """Plan the next chunk of a running sequence's prompt; returns the budget left.
        Admission reserved the prompt's pages, so this needs none (short of a copy for a
        forked tail); it never preempts sequences already planned."""
        length = min(budget, self.config.max_prefill_chunk, seq.num_uncomputed)
        if self.pages.can_allocate(self.pages.pages_needed(seq, seq.num_computed + length)):
            plan.copies += self.pages.prepare(seq, seq.num_computed + length)
            plan.prefills.append(PrefillChunk(seq, seq.num_computed, length))
            budget -= length
        return budget

    def _admit_head(self, copies: list[PageCopy], plan: StepPlan, budget: int) -> int:
        """Move the head of the queue (admitted by try_admit, which gave `copies`) into the
        running set with its first chunk; returns the budget left."""
        seq = self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        plan.copies += copies
        length = min(budget, self.config.max_prefill_chunk, seq.num_uncomputed)
        plan.prefills.append(PrefillChunk(seq, seq.num_computed, length))
        return budget - length

    def _reserve(self, seq: Sequence, length: int, plan: StepPlan) -> bool:
        """Pages for a decode's next `length` tokens, preempting later arrivals if
        needed. False when `seq` itself had to give way."""
        end = seq.num_computed + length
        while not self.pages.can_allocate(self.pages.pages_needed(seq, end)):
            victim = max(self.running, key=lambda s: s.order)
            if victim is seq and len(self.running) == 1:
                # It alone fills the pool (only reachable with shared pages): preempting
                # would bring it back to the same wall.
                self._finish(seq, "length")
                plan.finished.append(seq)
                return False
            # Victims are never already in the plan: decodes are visited in arrival
            # order, the victim is the latest arrival, and prefills come after.
            assert victim not in plan.decodes and all(c.seq is not victim for c in plan.prefills)
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        plan.copies += self.pages.prepare(seq, end)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.pages.release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Victims leave latest-first and each goes to the front, so the queue stays in
        # arrival order (everything waiting arrived after everything running).
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.token_ids and seq.token_ids[-1] == PENDING:  # ended (aborted, stopped) before its token was read
            seq.token_ids.pop()
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.pages.release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._live.pop(seq.seq_id, None)
