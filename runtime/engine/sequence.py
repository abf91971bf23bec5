"""One request's state inside the engine: its tokens, how far its KV is computed, its pages.

A sequence holds prompt and output tokens in one list because after a preemption the
engine recomputes both the same way (as one long prompt). `num_computed` counts the
leading tokens whose K/V already sit in the sequence's pages; everything after it is
what the next step still has to feed the model. A running sequence that has just
sampled a token has exactly one uncomputed token: that token, fed by the next decode.
"""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto
from typing import Any

from ..sampler import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # in the queue; holds no pages
    RUNNING = auto()  # admitted; holds pages for its tokens
    FINISHED = auto()  # done; pages given back (full ones stay in the prefix cache)


_ids = itertools.count()


class Sequence:
    """A request as the scheduler and the model runner see it.

    `page_table[i]` is the KV page holding positions [i*page_size, (i+1)*page_size).
    The scheduler and the page manager own `status`, `num_computed` and `page_table`;
    the model runner reads them and may keep its per-request sampler state in
    `sampler_state` (it survives preemption, so penalties and seeds carry over).
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        seq_id: int | None = None,
        arrival: float | None = None,
    ):
        self.seq_id = next(_ids) if seq_id is None else seq_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.arrival = time.monotonic() if arrival is None else arrival
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.page_table: list[int] = []
        self.finish_reason: str | None = None  # stop | length | abort
        self.num_cached_tokens = 0  # served by the prefix cache at the latest admission
        self.num_preemptions = 0
        self.sampler_state: Any = None
        self.state_slot: int | None = None  # hybrid models: its row of the linear-attention state pool

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.name}, tokens={self.num_prompt_tokens}+"
            f"{self.num_output_tokens}, computed={self.num_computed}, pages={self.page_table})"
        )

    @property
    def order(self) -> tuple[float, int]:
        """First come, first served: earlier arrival first; ids break ties."""
        return (self.arrival, self.seq_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed(self) -> int:
        """Tokens the model still has to see before this sequence can sample again."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token: int) -> None:
        self.token_ids.append(token)
