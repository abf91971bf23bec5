"""Fresh prompts' prefill calls replayed from CUDA graphs (the cuda executor's).

A prefill program call launches a few hundred kernels (Qwen3-0.6B: ~14 per layer, 28
layers), and at the one or two 128-token prompts a busy server admits per step, launching
them costs more than running them: on an H100 a warm 1 x 128 call took 4.1 ms, 2 x 128
3.8 ms, 8 x 128 8.1 ms (docs/perf/cuda-h100-prefill-profile.json). A prompt's first
chunk has no past, so its call depends on (rows, tokens) alone: one graph per bucket of
those, and a call is padded up to the smallest bucket that holds it, as decode batches
are. Inside the graph the new K/V go straight into the paged pool (padded positions write
the scratch slot), so only the logits leave it. Chunks with a past (prefix-cache hits, a
long prompt's later chunks) call the program directly, as before.

Padding a call costs its GPU time; graphs pay where launches dominate. So a bucket is
used when it holds at most SMALL_CALL_TOKENS positions, or at most PADDING_LIMIT times
the call's own; otherwise the program runs unpadded.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine.model_runner import to_pool_dtype

SMALL_CALL_TOKENS = 512  # at or below this many positions a call is launch-bound: padding is free
PADDING_LIMIT = 1.5
MIN_TOKENS = 16  # the smallest token bucket: shorter prompts pad to it


def time_replays(graph: torch.cuda.CUDAGraph, replays: int = 10) -> float:
    """Milliseconds per replay of `graph`, replays queued back to back (after one to warm
    up), so the host never holds the GPU up: the GPU's time alone."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def prefill_buckets(max_batch: int, max_tokens: int, budget: int) -> list[tuple[int, int]]:
    """(rows, tokens) buckets: tokens 16, 32, ... up to the program's chunk (which is a
    bucket of its own when it is not a power of two), rows 1, 2, 4, ... up to the batch,
    each holding at most `budget` positions (a step's prompt budget)."""
    widths, width = [], MIN_TOKENS
    while width < max_tokens:
        widths.append(width)
        width *= 2
    widths.append(max_tokens)
    buckets = []
    for width in widths:
        rows = 1
        while rows <= max_batch and rows * width <= max(budget, width):
            buckets.append((rows, width))
            rows *= 2
    return buckets


def pick_bucket(buckets, rows: int, width: int) -> tuple[int, int] | None:
    """The smallest bucket holding `rows` x `width`, if padding up to it is worth a graph."""
    fits = [b for b in buckets if b[0] >= rows and b[1] >= width]
    if not fits:
        return None
    best = min(fits, key=lambda b: (b[0] * b[1], b[1]))
    area = best[0] * best[1]
    return best if area <= max(SMALL_CALL_TOKENS, PADDING_LIMIT * rows * width) else None


class PrefillGraphs:
    """One captured prefill call per bucket over one KV pool. With `use_graphs` False the
    same padded step runs without capture (the CPU tests, and profiling)."""

    def __init__(self, program, k_pool: torch.Tensor, v_pool: torch.Tensor, scratch_slot: int, cache_shape,
                 past_dtype: torch.dtype, buckets, use_graphs: bool = True, pool=None):
        self.program, self.k_pool, self.v_pool, self.scratch = program, k_pool, v_pool, scratch_slot
        self.device = k_pool.device
        self.buckets = sorted(buckets, key=lambda b: b[0] * b[1], reverse=True)  # largest first: the rest reuse its memory
        self.use_graphs = use_graphs
        self._pool = pool
        self._cache_shape, self._past_dtype = cache_shape, past_dtype
        # per bucket: device inputs (tokens | positions | slots | last, one flat buffer so a
        # call is one copy), two host buffers taking turns (the engine's lookahead may write
        # a step's inputs while the previous copy is queued), and the graph.
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._hosts: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._turn: dict[tuple[int, int], int] = {}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}
        # Every graph leaves its logits in this one buffer (run copies its rows out at once):
        # a [rows, vocab] float32 output per graph would hold ~0.2 GB at Qwen3's vocabulary.
        self._logits: torch.Tensor | None = None
        for rows, width in self.buckets:
            size = rows * (3 * width + 1)
            self._inputs[rows, width] = torch.zeros(size, dtype=torch.long, device=self.device)
            hosts = [torch.zeros(size, dtype=torch.long) for _ in range(2)]
            self._hosts[rows, width] = [h.pin_memory() for h in hosts] if self.device.type == "cuda" else hosts
            self._turn[rows, width] = 0
        self._empty = {rows: (torch.zeros(cache_shape(rows, 0), dtype=past_dtype, device=self.device),
                              torch.zeros(rows, dtype=torch.long, device=self.device))
                       for rows in {b[0] for b in self.buckets}}

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        return pick_bucket(self.buckets, rows, width)

    def capture(self) -> None:
        """Warm each bucket's call up and capture it (largest first)."""
        for bucket in self.buckets:
            self._fill(bucket, [[0]], [[self.scratch]])
            self._inputs[bucket].copy_(self._hosts[bucket][self._turn[bucket]])
            if not self.use_graphs:
                self._graphs[bucket] = None
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # outside capture: lazy init, cuBLAS's kernel loading for this shape
                    logits = self._step(bucket)
            torch.cuda.current_stream().wait_stream(side)
            if self._logits is None:
                rows = max(b[0] for b in self.buckets)
                self._logits = torch.empty(rows, logits.shape[-1], dtype=logits.dtype, device=self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(bucket)
                self._logits[: logits.shape[0]].copy_(logits)
            self._graphs[bucket] = graph
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, bucket: tuple[int, int], token_rows: list[list[int]], slot_rows: list[list[int]]) -> torch.Tensor:
        """Logits [n, V] after each row's last token; the rows' K/V land in their slots."""
        self._turn[bucket] ^= 1
        self._fill(bucket, token_rows, slot_rows)
        self._inputs[bucket].copy_(self._hosts[bucket][self._turn[bucket]], non_blocking=True)
        graph = self._graphs.get(bucket)
        if graph is None:
            return self._step(bucket)[: len(token_rows)]
        graph.replay()
        return self._logits[: len(token_rows)].clone()  # the next replay overwrites it

    def replay_ms(self, bucket: tuple[int, int], replays: int = 10) -> float:
        """GPU time of one call of `bucket` (benchmarks)."""
        return time_replays(self._graphs[bucket], replays)

    def _fill(self, bucket, token_rows, slot_rows) -> None:
        """Write a call into this turn's host buffer. Padding: a row's extra tokens repeat
        its last position (inside the context) and write the scratch slot; extra rows are
        one-token rows of token 0, also into the scratch slot."""
        rows, width = bucket
        flat = self._hosts[bucket][self._turn[bucket]].numpy()
        tokens, positions, slots = (flat[i * rows * width:(i + 1) * rows * width].reshape(rows, width) for i in range(3))
        last = flat[3 * rows * width:]
        tokens.fill(0)
        slots.fill(self.scratch)
        positions.fill(0)
        last.fill(0)
        for row, (ids, row_slots) in enumerate(zip(token_rows, slot_rows)):
            n = len(ids)
            tokens[row, :n] = ids
            positions[row, :n] = np.arange(n)
            positions[row, n:] = n - 1
            slots[row, :n] = row_slots
            last[row] = n - 1

    def _step(self, bucket) -> torch.Tensor:
        """The call on the bucket's device inputs: the program, then its K/V into the pool."""
        rows, width = bucket
        flat = self._inputs[bucket]
        tokens, positions, slots = (flat[i * rows * width:(i + 1) * rows * width].view(rows, width) for i in range(3))
        last = flat[3 * rows * width:]
        empty, past_lens = self._empty[rows]
        logits, new_k, new_v = self.program(tokens, positions, empty, empty, past_lens, last)[:3]
        # [L, B, Hkv, T, D] -> [L, B * T, Hkv, D]: the pool's slot-major order
        slots = slots.reshape(-1)
        self.k_pool[:, slots] = to_pool_dtype(new_k.transpose(2, 3).flatten(1, 2), self.k_pool.dtype)
        self.v_pool[:, slots] = to_pool_dtype(new_v.transpose(2, 3).flatten(1, 2), self.v_pool.dtype)
        return logits
