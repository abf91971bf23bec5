"""Prefill calls replayed from CUDA graphs (the cuda executor's).

A prefill program call launches a few hundred kernels (Qwen3-0.6B: ~14 per layer, 28
layers), and at the one or two 128-token prompts a busy server admits per step, launching
them costs more than running them: on an H100 a warm 1 x 128 call took 4.1 ms, 2 x 128
3.8 ms, 8 x 128 8.1 ms (docs/perf/cuda-h100-prefill-profile.json). So each call shape the
engine sends often gets a graph, and a call is padded up to the smallest bucket that
holds it, as decode batches are:

- fresh prompts (no past): buckets of (rows, tokens);
- a few rows with a past (a prefix-cache hit, a long prompt's later chunk): buckets of
  (rows, tokens, past). Inside the graph the past is gathered from the paged pool through
  slot indices (padded with the scratch slot), so the call takes no host-built past
  tensor. The past dimension is bucketed coarsely (PAST_BUCKETS): the generated prefill
  attention kernel walks each row's real past length, so padding the past costs only the
  gather.

Inside every graph the new K/V go straight into the pool (padded positions write the
scratch slot), so only the logits leave it. Padding a call costs GPU time; graphs pay
where launches dominate. So a bucket is used when its rows x tokens are at most
SMALL_CALL_TOKENS or at most PADDING_LIMIT times the call's own; otherwise, and for
pasts longer than the largest bucket, the program runs directly, as before.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine.model_runner import to_pool_dtype

SMALL_CALL_TOKENS = 512  # at or below this many positions a call is launch-bound: padding is free
PADDING_LIMIT = 1.5
MIN_TOKENS = 16  # the smallest token bucket: shorter prompts pad to it
PAST_BUCKETS = (128, 512, 2048)  # longer pasts call the program directly
PAST_ROWS = (1, 2)  # rows of calls with a past: prefix-cache hits arrive a few at a time


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


def prefill_buckets(max_batch: int, max_tokens: int, budget: int, max_context: int) -> list[tuple[int, int, int]]:
    """(rows, tokens, past) buckets. Tokens 16, 32, ... up to the program's chunk (which is a
    bucket of its own when it is not a power of two). Without a past: rows 1, 2, 4, ... up
    to the batch, each bucket within `budget` positions (a step's prompt budget). With a
    past: PAST_ROWS rows and the PAST_BUCKETS that fit the context beside the tokens."""
    widths, width = [], MIN_TOKENS
    while width < max_tokens:
        widths.append(width)
        width *= 2
    widths.append(max_tokens)
    buckets = []
    for width in widths:
        rows = 1
        while rows <= max_batch and rows * width <= max(budget, width):
            buckets.append((rows, width, 0))
            rows *= 2
    for past in PAST_BUCKETS:
        buckets += [(rows, width, past) for width in widths for rows in PAST_ROWS
                    if rows <= max_batch and past + width <= max_context]
    return buckets


def pick_bucket(buckets, rows: int, width: int, past: int = 0) -> tuple[int, int, int] | None:
    """The smallest bucket holding `rows` x `width` new tokens after pasts of up to `past`
    positions, if padding up to it is worth a graph (None: call the program directly)."""
    fits = [b for b in buckets if b[0] >= rows and b[1] >= width and (b[2] >= past if past else b[2] == 0)]
    if not fits:
        return None
    best = min(fits, key=lambda b: (b[0] * b[1], b[1], b[2]))
    area = best[0] * best[1]
    return best if area <= max(SMALL_CALL_TOKENS, PADDING_LIMIT * rows * width) else None


Bucket = tuple[int, int, int]  # rows, tokens, past


def _even(n: int) -> int:
    """n rounded up to even: int64 segments of an even length keep the next one 16-byte aligned."""
    return n + n % 2


class PrefillGraphs:
    """One captured prefill call per bucket over one KV pool. With `use_graphs` False the
    same padded step runs without capture (the CPU tests, and profiling)."""

    def __init__(self, program, k_pool: torch.Tensor, v_pool: torch.Tensor, scratch_slot: int, cache_shape,
                 past_dtype: torch.dtype, buckets, use_graphs: bool = True, pool=None):
        self.program, self.k_pool, self.v_pool, self.scratch = program, k_pool, v_pool, scratch_slot
        self.device = k_pool.device
        # largest first: the rest reuse its memory
        self.buckets = sorted(buckets, key=lambda b: (b[0] * b[1], b[2]), reverse=True)
        self.use_graphs = use_graphs
        self._pool = pool
        self._past_dtype = past_dtype
        # per bucket: device inputs in one flat buffer, so a call is one copy (tokens,
        # positions, slots [rows x tokens] | last, past lengths [rows] | past slots [rows x
        # past]), two host buffers taking turns (the engine's lookahead may write a step's
        # inputs while the previous copy is queued), and the graph.
        self._inputs: dict[Bucket, torch.Tensor] = {}
        self._hosts: dict[Bucket, list[torch.Tensor]] = {}
        self._turn: dict[Bucket, int] = {}
        self._graphs: dict[Bucket, torch.cuda.CUDAGraph | None] = {}
        # Every graph leaves its logits in this one buffer (run copies its rows out at once):
        # a [rows, vocab] float32 output per graph would hold ~0.2 GB at Qwen3's vocabulary.
        self._logits: torch.Tensor | None = None
        for rows, width, past in self.buckets:
            size = rows * (3 * width + past) + 2 * _even(rows)
            self._inputs[rows, width, past] = torch.zeros(size, dtype=torch.long, device=self.device)
            hosts = [torch.zeros(size, dtype=torch.long) for _ in range(2)]
            self._hosts[rows, width, past] = [h.pin_memory() for h in hosts] if self.device.type == "cuda" else hosts
            self._turn[rows, width, past] = 0
        self._empty = {rows: torch.zeros(cache_shape(rows, 0), dtype=past_dtype, device=self.device)
                       for rows in {b[0] for b in self.buckets}}

    def bucket(self, rows: int, width: int, past: int = 0) -> Bucket | None:
        return pick_bucket(self.buckets, rows, width, past)

    def capture(self) -> None:
        """Warm each bucket's call up and capture it (largest first)."""
        for bucket in self.buckets:
            self._fill(bucket, [[0]], [[self.scratch]], [0], [[]])
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
            graph.replay()  # a graph's first replay uploads it: 6-20 ms on an H100, not on a request's path
            self._graphs[bucket] = graph
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, bucket: Bucket, token_rows: list[list[int]], slot_rows: list[list[int]],
            starts: list[int] | None = None, past_slot_rows=None) -> torch.Tensor:
        """Logits [n, V] after each row's last token; the rows' K/V land in their slots.
        Row i continues a past of starts[i] positions held in past_slot_rows[i]."""
        n = len(token_rows)
        self._turn[bucket] ^= 1
        self._fill(bucket, token_rows, slot_rows, starts or [0] * n, past_slot_rows or [[]] * n)
        self._inputs[bucket].copy_(self._hosts[bucket][self._turn[bucket]], non_blocking=True)
        graph = self._graphs.get(bucket)
        if graph is None:
            return self._step(bucket)[:n]
        graph.replay()
        return self._logits[:n].clone()  # the next replay overwrites it

    def replay_ms(self, bucket: Bucket, replays: int = 10) -> float:
        """GPU time of one call of `bucket` (benchmarks)."""
        return time_replays(self._graphs[bucket], replays)

    def _views(self, flat, bucket: Bucket):
        """(tokens, positions, slots [rows, tokens], last, past_lens [rows], past_slots [rows, past]).
        Every view starts 16 bytes into the buffer or a multiple of that: the program copies a
        misaligned input on each call (AOTInductor warned of it on an H100)."""
        rows, width, past = bucket
        seg, pad = rows * width, _even(rows)
        tokens, positions, slots = (flat[i * seg:(i + 1) * seg].reshape(rows, width) for i in range(3))
        last, past_lens = flat[3 * seg:3 * seg + rows], flat[3 * seg + pad:3 * seg + pad + rows]
        return tokens, positions, slots, last, past_lens, flat[3 * seg + 2 * pad:].reshape(rows, past)

    def _fill(self, bucket, token_rows, slot_rows, starts, past_slot_rows) -> None:
        """Write a call into this turn's host buffer. Padding: a row's extra tokens repeat
        its last position (inside the context) and write the scratch slot; extra rows are
        one-token rows of token 0 with no past; unused past positions read the scratch slot
        (finite values, masked by the past length)."""
        tokens, positions, slots, last, past_lens, past_slots = self._views(
            self._hosts[bucket][self._turn[bucket]].numpy(), bucket)
        tokens.fill(0)
        positions.fill(0)
        slots.fill(self.scratch)
        last.fill(0)
        past_lens.fill(0)
        past_slots.fill(self.scratch)
        for row, (ids, row_slots, start, old) in enumerate(zip(token_rows, slot_rows, starts, past_slot_rows)):
            n = len(ids)
            tokens[row, :n] = ids
            positions[row, :n] = np.arange(start, start + n)
            positions[row, n:] = start + n - 1
            slots[row, :n] = row_slots
            last[row] = n - 1
            past_lens[row] = start
            past_slots[row, :start] = old

    def _step(self, bucket) -> torch.Tensor:
        """The call on the bucket's device inputs: the past gathered from the pool, the
        program, then its new K/V into the pool."""
        rows, width, past = bucket
        tokens, positions, slots, last, past_lens, past_slots = self._views(self._inputs[bucket], bucket)
        if past:  # [L, rows * past, Hkv, D] -> [L, rows, Hkv, past, D], contiguous as the program takes it
            L, _, heads, dim = self.k_pool.shape
            past_k, past_v = (pool[:, past_slots.reshape(-1)].view(L, rows, past, heads, dim).transpose(2, 3)
                              .to(self._past_dtype).contiguous() for pool in (self.k_pool, self.v_pool))
        else:
            past_k = past_v = self._empty[rows]
        logits, new_k, new_v = self.program(tokens, positions, past_k, past_v, past_lens, last)[:3]
        # [L, B, Hkv, T, D] -> [L, B * T, Hkv, D]: the pool's slot-major order
        slots = slots.reshape(-1)
        self.k_pool[:, slots] = to_pool_dtype(new_k.transpose(2, 3).flatten(1, 2), self.k_pool.dtype)
        self.v_pool[:, slots] = to_pool_dtype(new_v.transpose(2, 3).flatten(1, 2), self.v_pool.dtype)
        return logits
