"""A stand-in model runner for engine tests: no weights, no compiled bundle.

Its "KV cache" stores, at each slot, the token id written there. The next token is a
function of everything it reads back through the page table, so a wrong page table, a
copy not made, a shared page overwritten, or a recompute that differs changes the output
and the comparison with `reference` fails.
"""

from __future__ import annotations

import torch

from arle_runtime.engine import PageManager, Scheduler, StepPlan

VOCAB = 50


def next_token(content: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(content)) + 7 * len(content)) % VOCAB


def reference(prompt: list[int], count: int) -> list[int]:
    """What greedy decoding gives without any paging."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeRunner:
    def __init__(self, pages: PageManager):
        self.pages = pages
        self.kv = torch.full((pages.num_pages * pages.page_size,), -1, dtype=torch.long)

    def step(self, plan: StepPlan) -> list[int]:
        self.copy(plan.copies)
        for seq in plan.decodes:
            self.write(seq, seq.num_tokens - 1, 1)
        for chunk in plan.prefills:
            self.write(chunk.seq, chunk.start, chunk.length)
        return [next_token(self.read(seq, seq.num_tokens)) for seq in plan.sampling]

    def copy(self, copies) -> None:
        if copies:  # one gather, then one scatter, as a real runner would
            pages = self.kv.view(-1, self.pages.page_size)
            pages[[c.dst for c in copies]] = pages[[c.src for c in copies]]

    def write(self, seq, start: int, length: int) -> None:
        self.kv[self.pages.slots(seq, start, length)] = torch.tensor(seq.token_ids[start : start + length])

    def read(self, seq, length: int) -> list[int]:
        return self.kv[self.pages.slots(seq, 0, length)].tolist()


def drive(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000, on_step=None) -> int:
    """Run the engine loop until every request is done; return the number of steps."""
    for steps in range(1, max_steps + 1):
        if not sched.has_work:
            return steps - 1
        plan = sched.schedule()
        assert not plan.is_empty or plan.finished, f"stalled with {sched.waiting} waiting"
        sched.postprocess(plan, runner.step(plan))
        if on_step is not None:
            on_step(plan)
    raise AssertionError("the engine did not finish")
