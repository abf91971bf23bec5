"""Tensors in, logits out: runs a StepPlan on an executor over a paged KV pool.

The pool is two tensors, K and V, of shape [L, slots + 2, Hkv, D]: slot s is page
s // page_size, offset s % page_size, so `PageManager.slots` indexes it directly and a
page copy is a 16-slot index copy. Slot-major (slots before heads) keeps one position's
K for all heads contiguous, which is what a scatter of new tokens writes. Two extra
slots: the first is kept at zero and pads shorter rows of a gathered batch (a masked
position still enters the attention's value product as 0 * value, so padding must be
finite, never uninitialised memory); the second takes the K/V written by padded rows of
a CUDA-graph decode bucket.

The cpu programs take a dense past [L, B, Hkv, P, D], so each step gathers every running
sequence's past out of its pages into one padded tensor (P = longest past in the batch,
rows masked by past_lens): O(batch * context) per step. A paged executor (cuda) decodes
straight from the pool through the page tables; its prefill chunks still gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ArleError
from ..executor import Executor
from ..generate import empty_state
from .kv_pages import PageManager
from .scheduler import PrefillChunk, StepPlan
from .sequence import Sequence

DEFAULT_KV_MEMORY_BYTES = 1 << 30  # 1 GiB unless told otherwise


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, executor: Executor) -> "KVLayout":
        layers, _, heads, _, dim = executor.cache_shape(batch=1, length=1)
        return cls(layers, heads, dim, executor.kv_dtype)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one position, all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def to_pool_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast new K/V for the pool; an fp8 pool (unit scale) saturates instead of
    overflowing to NaN, which is what a plain cast to e4m3fn does past +-448."""
    if dtype == torch.float8_e4m3fn:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def default_kv_budget(device: torch.device) -> int:
    """1 GiB of host memory on a CPU; on a GPU, half of what is free after the weights
    (the rest is for activations, CUDA graphs and the sampler)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return DEFAULT_KV_MEMORY_BYTES


def pool_pages(
    executor: Executor,
    page_size: int,
    kv_pages: int | None = None,
    kv_memory_bytes: int | None = None,
) -> int:
    """How many KV pages to allocate: `kv_pages` if given; else room for max_batch
    sequences of the full context, capped by the memory budget (default_kv_budget), but
    never below one full-context sequence (a bundle must run its own context)."""
    if kv_pages is not None:
        if kv_pages < 1:
            raise ArleError(f"kv_pages must be at least 1, got {kv_pages}.", param="kv_pages")
        return kv_pages
    limits = executor.limits
    per_page = KVLayout.of(executor).bytes_per_token * page_size
    want = limits.max_batch * -(-limits.max_context // page_size)
    budget = default_kv_budget(executor.device) if kv_memory_bytes is None else kv_memory_bytes
    floor = -(-limits.max_context // page_size)
    return max(min(want, budget // per_page), floor)


def prefill_groups(
    chunks: list[PrefillChunk], limits, padding_limit: float = 1.0, equal_lengths: bool = False
) -> list[list[PrefillChunk]]:
    """A step's prefill chunks grouped into program calls: one call per group, rows padded
    to the group's longest past and chunk. A group stays within the program's batch and
    context, and computes at most `padding_limit` x its real positions (rows x (longest
    past + longest chunk) against the sum of the rows' own). The executor sets the limit:
    where a call is compute-bound (the CPU: one 4 x 128 call took the same 0.42 s as four
    1 x 128 calls) padding is pure loss, so only equal rows share a call (1.0); where a
    call is bound by weight reads and kernel launches (a GPU at a few hundred tokens),
    padded rows cost little and every call saved counts.
    `equal_lengths`: a hybrid model's recurrent state would absorb padding tokens, so only
    chunks of one length share a call. Depends on (start, length) alone, so every
    tensor-parallel rank groups a plan the same way."""
    groups: list[list[PrefillChunk]] = []
    for chunk in sorted(chunks, key=lambda c: (c.length, c.start), reverse=True):
        group = groups[-1] if groups else None
        if group and _fits(group + [chunk], limits, padding_limit) and (
            not equal_lengths or chunk.length == group[0].length
        ):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups


def _fits(rows: list[PrefillChunk], limits, padding_limit: float) -> bool:
    width, past = max(c.length for c in rows), max(c.start for c in rows)
    real = sum(c.start + c.length for c in rows)
    return (
        len(rows) <= limits.max_batch
        and past + width <= limits.max_context
        and len(rows) * (past + width) <= padding_limit * real
    )


class ModelRunner:
    """Owns the KV pool; `run(plan)` applies copies, runs decodes and prefill chunks,
    writes their new K/V into the pages and returns logits in `plan.sampling` order."""

    def __init__(self, executor: Executor, pages: PageManager):
        self.executor = executor
        self.pages = pages
        self.layout = KVLayout.of(executor)
        lay = self.layout
        self.num_slots = pages.num_pages * pages.page_size
        shape = (lay.num_layers, self.num_slots + 2, lay.num_kv_heads, lay.head_dim)
        # empty: the OS commits pool memory as pages are first written, not at start.
        self.k = torch.empty(shape, dtype=lay.dtype, device=executor.device)
        self.v = torch.empty_like(self.k)
        self.k[:, self.num_slots].zero_()
        self.v[:, self.num_slots].zero_()
        self.pad_slot = self.num_slots
        self.scratch_slot = self.num_slots + 1
        self.past_dtype = getattr(executor, "compute_dtype", lay.dtype)
        self.paged = getattr(executor, "paged", False)
        self.prefill_padding_limit = getattr(executor, "prefill_padding_limit", 1.0)  # see prefill_groups
        # Hybrid models: the linear-attention state pool, [Llin, state slots + 1, ...] per
        # tensor; the extra row takes what padded rows of a CUDA-graph decode bucket write.
        self.state = empty_state(executor, pages.num_state_slots + 1) if pages.num_state_slots else ()
        if self.paged:
            if self.state:
                executor.bind_state_pool(self.state, pages.num_state_slots)
            executor.bind_kv_pool(self.k, self.v, self.scratch_slot)
        # cuda: prefill calls replayed from graphs that gather the past and write the pool (runtime/prefill_graphs.py)
        self.prefill_graphs = getattr(executor, "prefill_graphs", None) if self.paged else None
        self._offsets = torch.arange(pages.page_size, device=executor.device)
        self._layer_index = torch.arange(lay.num_layers, device=executor.device)[:, None, None, None]
        self._head_index = torch.arange(lay.num_kv_heads, device=executor.device)[None, None, :, None]

    @property
    def pool_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.executor.device)

    # --- the step -------------------------------------------------------------------

    @torch.no_grad()
    def run(self, plan: StepPlan, feed: list[int] | None = None) -> torch.Tensor:
        """Logits [len(plan.sampling), V] float32 for the plan's sampling order. `feed`
        (the engine's lookahead): for each decode, the row of the executor's feed buffer
        that holds its input token, still on the device."""
        self.copy_pages(plan.copies)
        limit = self.executor.limits.max_batch
        blocks = [self._decode(plan.decodes[i : i + limit], None if feed is None else feed[i : i + limit])
                  for i in range(0, len(plan.decodes), limit)]
        sampled: dict[int, torch.Tensor] = {}  # id(chunk) -> its logits row
        for group in prefill_groups(plan.prefills, self.executor.limits, self.prefill_padding_limit, bool(self.state)):
            logits = self._prefill(group)
            for row, chunk in enumerate(group):
                if chunk.samples:
                    sampled[id(chunk)] = logits[row : row + 1]
        blocks += [sampled[id(chunk)] for chunk in plan.prefills if chunk.samples]
        if not blocks:
            return torch.empty(0, 0)
        # A decode-only step hands the executor's logits on as they are (no per-row copies).
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def copy_pages(self, copies) -> None:
        if not copies:
            return
        ps = self.pages.page_size
        src = (self._long([c.src for c in copies])[:, None] * ps + self._offsets).flatten()
        dst = (self._long([c.dst for c in copies])[:, None] * ps + self._offsets).flatten()
        # One gather, then one scatter (the right-hand side is materialised first):
        # a page given up as one copy's source may be another copy's destination.
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def _decode(self, batch: list[Sequence], feed: list[int] | None = None) -> torch.Tensor:
        positions = [seq.num_tokens - 1 for seq in batch]  # == num_computed: the one uncomputed token
        if self.paged:
            ps = self.pages.page_size
            args = (
                [seq.last_token for seq in batch],
                positions,
                [self.pages.slots(seq, p, 1)[0] for seq, p in zip(batch, positions)],
                [seq.page_table[: p // ps + 1] for seq, p in zip(batch, positions)],
            )
            extra = {} if feed is None else {"feed": feed}
            if self.state:  # the rows' linear state is read and written inside the step (graph)
                extra["state_slots"] = [seq.state_slot for seq in batch]
            return self.executor.decode_paged(*args, **extra)
        past_k, past_v = self.gather(batch, positions)
        pos = self._long(positions)
        tokens = self._long([[seq.last_token] for seq in batch])
        last = torch.zeros(len(batch), dtype=torch.long, device=self.executor.device)
        state = self.gather_state(batch)
        logits, new_k, new_v, *state = self.executor.decode(tokens, pos[:, None], past_k, past_v, pos, last, *state)
        self.scatter_state(batch, state)
        slots = self._long([self.pages.slots(seq, p, 1)[0] for seq, p in zip(batch, positions)])
        self.k[:, slots] = to_pool_dtype(new_k[:, :, :, 0], self.k.dtype)
        self.v[:, slots] = to_pool_dtype(new_v[:, :, :, 0], self.v.dtype)
        return logits

    def _prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """One program call for a group of chunks (prefill_groups): rows padded at the end
        to the longest chunk. The step's mask is causal by index, so a padded token is
        seen by no real one; its position repeats the row's last, keeping every position
        inside the context, and its K/V is dropped."""
        seqs, starts = [c.seq for c in chunks], [c.start for c in chunks]
        width = max(c.length for c in chunks)
        if self.prefill_graphs is not None and not self.state:
            bucket = self.prefill_graphs.bucket(len(chunks), width, max(starts))
            if bucket is not None:  # a graph replay gathers the past and writes the pool itself
                return self.prefill_graphs.run(
                    bucket, [c.token_ids for c in chunks], [self.pages.slots(c.seq, c.start, c.length) for c in chunks],
                    starts, [self._past_slots(c.seq, c.start) for c in chunks])
        past_k, past_v = self.gather(seqs, starts)
        pad = [width - c.length for c in chunks]
        tokens = self._long([c.token_ids + [0] * n for c, n in zip(chunks, pad)])
        positions = self._long(
            [list(range(c.start, c.start + c.length)) + [c.start + c.length - 1] * n for c, n in zip(chunks, pad)]
        )
        past_lens = self._long(starts)
        last = self._long([c.length - 1 for c in chunks])
        state = self.gather_state(seqs)
        fresh = [row for row, c in enumerate(chunks) if c.start == 0]
        for tensor in state:  # a prompt's first chunk (also after a preemption) starts from zero
            tensor[:, fresh] = 0
        logits, new_k, new_v, *state = self.executor.prefill(tokens, positions, past_k, past_v, past_lens, last, *state)
        self.scatter_state(seqs, state)
        slots = self._long([s for c in chunks for s in self.pages.slots(c.seq, c.start, c.length)])
        # [L, B, Hkv, T, D] -> the real (row, token) pairs -> [L, N, Hkv, D], the pool's slot-major order.
        if any(pad):
            rows = self._long([row for row, c in enumerate(chunks) for _ in range(c.length)])
            cols = self._long([t for c in chunks for t in range(c.length)])
            k, v = new_k.permute(1, 3, 0, 2, 4)[rows, cols], new_v.permute(1, 3, 0, 2, 4)[rows, cols]
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        else:
            k, v = new_k.transpose(2, 3).flatten(1, 2), new_v.transpose(2, 3).flatten(1, 2)
        self.k[:, slots] = to_pool_dtype(k, self.k.dtype)
        self.v[:, slots] = to_pool_dtype(v, self.v.dtype)
        return logits

    # --- linear-attention state (hybrid models; a no-op for the others) ----------------

    def gather_state(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ...]:
        if not self.state:
            return ()
        rows = self._long([seq.state_slot for seq in seqs])
        return tuple(pool[:, rows] for pool in self.state)

    def scatter_state(self, seqs: list[Sequence], state) -> None:
        if not self.state:
            return
        rows = self._long([seq.state_slot for seq in seqs])
        for pool, new in zip(self.state, state):
            pool[:, rows] = new.to(pool.dtype)

    def _past_slots(self, seq: Sequence, length: int) -> np.ndarray:
        """Slots of positions [0, length) on the host, from the page table with numpy."""
        ps = self.pages.page_size
        table = np.asarray(seq.page_table[: -(-length // ps)], dtype=np.int64)
        return (table[:, None] * ps + np.arange(ps)).reshape(-1)[:length]

    def _slots(self, seq: Sequence, length: int) -> torch.Tensor:
        """Slots of positions [0, length), built from the page table as a tensor
        (PageManager.slots in a Python loop costs too much at long contexts)."""
        ps = self.pages.page_size
        table = self._long(seq.page_table[: -(-length // ps)])
        return (table[:, None] * ps + self._offsets).flatten()[:length]

    def gather(self, seqs: list[Sequence], past_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense past K/V [L, B, Hkv, P, D] of each sequence's first past_lens[b] positions,
        padded with the zero slot up to P = max(past_lens)."""
        P = max(past_lens)
        pad = torch.full((P,), self.pad_slot, dtype=torch.long, device=self.executor.device)
        rows = []
        for seq, n in zip(seqs, past_lens):
            rows += [self._slots(seq, n), pad[: P - n]]
        idx = torch.cat(rows).view(1, len(seqs), 1, P)
        # One advanced-indexing gather straight into [L, B, Hkv, P, D]: 1.5x faster than
        # index_select + transpose-copy (measured: 40 vs 59 ms for 8 x 256 positions of
        # the 135M model's K on one CPU thread).
        k = self.k[self._layer_index, idx, self._head_index]
        v = self.v[self._layer_index, idx, self._head_index]
        if k.dtype != self.past_dtype:  # an fp8 pool: the programs take their compute dtype
            k, v = k.to(self.past_dtype), v.to(self.past_dtype)
        return k, v
