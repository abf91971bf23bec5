"""The CUDA executor: AOTInductor packages on the GPU, decode replayed from CUDA graphs.

Load does no compiling: the packages hold their cubins, the weights are copied from the
bundle's safetensors to the GPU once and handed to both programs. When the engine binds
its KV pool, one CUDA graph is captured per decode bucket of the manifest (1, 2, 4, 8,
16, ...); a decode step pads its batch up to the next bucket, copies one small host
buffer in (tokens, positions, slots, page table) and replays the graph, which runs the
paged-decode program and writes the new K/V into the pool. Prefill chunks run the
prefill program directly (their shapes vary too much for graphs).
"""

from __future__ import annotations

import bisect
import logging
import os

import torch

from .bundle import Bundle
from .engine.model_runner import to_pool_dtype
from .errors import ArleError
from .executor import AotiExecutor
from .preload import libstdcxx_problem

log = logging.getLogger("arle.cuda")

# Host buffer columns: token, position (= past length), slot for the new K/V, unused, page table...
_TOKEN, _POS, _SLOT, _TABLE = 0, 1, 2, 4


class CudaGraphExecutor(AotiExecutor):
    paged = True
    program_names = ("prefill", "decode_paged")
    dense_decode_program = "prefill"  # one token over a dense past (verify, the reference loop)
    # A prefill call of a few hundred tokens is bound by weight reads and kernel launches,
    # not FLOPs: rows padded by up to a quarter cost less than a call of their own.
    prefill_padding_limit = 1.25

    def __init__(self, bundle: Bundle):
        problem = libstdcxx_problem()
        if problem:
            raise ArleError(problem)
        device = torch.device("cuda", torch.cuda.current_device())
        weights = {n: t.to(device, non_blocking=True) for n, t in bundle.weights.items()}
        # single-threaded runners: no container lock around run, which CUDA graph capture needs.
        super().__init__(bundle, device, weights, single_threaded=True)
        decode = bundle.manifest["programs"]["decode_paged"]
        self.decode_buckets = sorted(bundle.manifest["buckets"]["decode_batch_sizes"])
        self.page_size = decode["page_size"]
        self.table_width = decode["page_table_width"]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor, torch.Tensor | None]] = {}
        self._host = torch.zeros(self.decode_buckets[-1], _TABLE + self.table_width, dtype=torch.long).pin_memory()
        self._host_np = self._host.numpy()  # same memory; numpy row writes cost far less than torch's
        self.graph_capture_s = 0.0
        self.route: dict[int, int] = {}  # batch size -> bucket, from measured replay times
        self.replay_ms: dict[int, float] = {}
        # ARLE_CUDA_GRAPHS=0 runs the same decode program without graphs (for profiling).
        self.use_graphs = os.environ.get("ARLE_CUDA_GRAPHS", "1") != "0"

    # --- the paged decode path ----------------------------------------------------------

    def bind_kv_pool(self, k_pool: torch.Tensor, v_pool: torch.Tensor, scratch_slot: int) -> None:
        """Capture one graph per decode bucket over this pool; padded rows write their K/V
        into scratch_slot, which no sequence owns."""
        import time

        started = time.perf_counter()
        self._k_pool, self._v_pool, self._scratch = k_pool, v_pool, scratch_slot
        self._graphs.clear()
        pool = torch.cuda.graph_pool_handle()
        for bucket in sorted(self.decode_buckets, reverse=True):  # largest first: the rest reuse its memory
            inputs = torch.zeros(bucket, _TABLE + self.table_width, dtype=torch.long, device=self.device)
            inputs[:, _SLOT] = scratch_slot
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside capture (lazy init, allocator)
                    self._paged_step(inputs)
            torch.cuda.current_stream().wait_stream(side)
            if not self.use_graphs:
                self._graphs[bucket] = (None, inputs, None)
                continue
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._paged_step(inputs)
            self._graphs[bucket] = (graph, inputs, logits)
        torch.cuda.synchronize()
        self.route = self._route_by_replay_time() if self.use_graphs else {}
        self.graph_capture_s = time.perf_counter() - started

    def _route_by_replay_time(self, replays: int = 10) -> dict[int, int]:
        """Batch size -> the bucket whose graph decodes it fastest. A bigger bucket can be
        faster than the smallest one that fits: cuBLAS picks its kernels by M, and on the
        H200 a Qwen3-0.6B step measured 1.48 ms at batch 1 but 1.22 ms at batch 16.
        Timed here, on this card, with the real pool (~10 replays per bucket)."""
        ms = {bucket: self.replay_time_ms(bucket, replays) for bucket in self._graphs}
        self.replay_ms = ms
        route = {}
        for n in range(1, self.decode_buckets[-1] + 1):
            fits = [b for b in self.decode_buckets if b >= n]
            route[n] = min(fits, key=lambda b: (round(ms[b], 2), b))  # ties (within 10 us) go to the smaller
        log.info("decode graph replay ms per bucket: %s", {b: round(t, 3) for b, t in sorted(ms.items())})
        return route

    def replay_time_ms(self, bucket: int, replays: int = 10) -> float:
        """GPU time of one decode step of `bucket`: replays queued back to back, so the
        host never holds the GPU up (the engine's per-token time minus this is host work)."""
        graph = self._graphs[bucket][0]
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / replays

    def _paged_step(self, inputs: torch.Tensor) -> torch.Tensor:
        # Every program input contiguous: AOTInductor assumes the strides it was compiled
        # with and does not check them (a column slice here once fed row 0's slot number
        # to row 1 as its token id).
        # clone, not contiguous(): a one-row bucket's column slice is already contiguous but
        # 8 bytes into the buffer, and a misaligned input makes the program copy it per call.
        tokens = inputs[:, _TOKEN : _TOKEN + 1].clone()
        positions = inputs[:, _POS : _POS + 1].clone()
        past_lens = inputs[:, _POS].to(torch.int32)
        table = inputs[:, _TABLE:].to(torch.int32)
        logits, new_k, new_v = self._programs["decode_paged"](tokens, positions, self._k_pool, self._v_pool, table, past_lens)
        slots = inputs[:, _SLOT]
        self._k_pool[:, slots] = to_pool_dtype(new_k, self._k_pool.dtype)
        self._v_pool[:, slots] = to_pool_dtype(new_v, self._v_pool.dtype)
        return logits

    def decode_paged(self, tokens: list[int], positions: list[int], slots: list[int], page_tables: list[list[int]]):
        """Logits [n, V] for n sequences decoding one token each; writes their K/V into the pool."""
        n = len(tokens)
        if not self._graphs:
            raise ArleError("decode_paged needs bind_kv_pool first.")
        if not 1 <= n <= self.decode_buckets[-1]:
            raise ArleError(f"A batch of {n} is outside this bundle's range 1..{self.decode_buckets[-1]}.")
        bucket = self.route.get(n) or self.decode_buckets[bisect.bisect_left(self.decode_buckets, n)]
        graph, inputs, logits = self._graphs[bucket]
        if max(positions) + 1 > self.limits.max_context:
            raise ArleError(
                f"The sequence would reach {max(positions) + 1} tokens, past this bundle's context of "
                f"{self.limits.max_context}."
            )
        host = self._host_np[:bucket]
        host.fill(0)
        host[:, _SLOT] = self._scratch
        host[:n, _TOKEN], host[:n, _POS], host[:n, _SLOT] = tokens, positions, slots
        for row, table in enumerate(page_tables):
            host[row, _TABLE : _TABLE + len(table)] = table
        inputs.copy_(self._host[:bucket], non_blocking=True)
        if graph is None:
            return self._paged_step(inputs)[:n]
        graph.replay()
        return logits[:n].clone()
