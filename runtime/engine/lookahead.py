"""Lookahead: the next decode step is queued on the GPU before the last one's tokens are read.

A decode step on a GPU is a CUDA-graph replay the host queues in microseconds and then
waits for. Run synchronously, everything the host does between two steps (reading the
sampled tokens, the scheduler's bookkeeping, detokenizing, stop checks, filling the next
step's inputs) and the graph's own launch latency leave the GPU idle: on the H200 a
Qwen3-0.6B token took 1.58 ms through the engine against 1.25 ms of graph replay
(docs/perf/cuda-h200.md).

With lookahead, a step whose sampling rows are all plain greedy picks its tokens on the
device: the argmax stays there as the next step's input (the executor's feed buffer) and
is copied to pinned host memory without waiting. The engine then plans the next step
(`Scheduler.schedule_lookahead`: a decode for each running sequence, whose last token is
still PENDING), queues it, and only then waits for the previous tokens, so that wait and
all the host work after it overlap the next step's GPU time. A sequence that stops on a
token it was waiting for costs one wasted row in the step already queued; that row's K/V
lands in a page the sequence gave back, and whatever reuses the page writes it later in
the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheduler import StepPlan


@dataclass
class InFlight:
    """A launched step whose greedy tokens are still on their way to the host."""

    plan: StepPlan
    host: torch.Tensor  # the pinned buffer the tokens are copied into
    done: torch.cuda.Event | None  # recorded after that copy (None on a CPU: already there)
    rows: dict[int, int]  # seq_id -> its row of the step's tokens (= of the executor's feed)

    def tokens(self) -> list[int]:
        """The step's tokens, in plan.sampling order (waits for the copy, not for later work)."""
        if self.done is not None:
            self.done.synchronize()
        return self.host[: len(self.plan.sampling)].tolist()


class DeviceGreedy:
    """Argmax on the device into the executor's feed, and a copy to the host that does not
    wait. Two pinned buffers take turns: the lookahead keeps at most two steps unread."""

    def __init__(self, executor, rows: int):
        self.executor = executor
        cuda = executor.device.type == "cuda"
        self.buffers = [torch.empty(rows, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self.cuda = cuda
        self.turn = 0

    def launch(self, plan: StepPlan, logits: torch.Tensor) -> InFlight:
        tokens = torch.argmax(logits, dim=-1)
        self.executor.set_feed(tokens)
        host = self.buffers[self.turn]
        self.turn ^= 1
        host[: tokens.numel()].copy_(tokens, non_blocking=self.cuda)
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        return InFlight(plan, host, done, {seq.seq_id: row for row, seq in enumerate(plan.sampling)})
