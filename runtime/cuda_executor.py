"""The CUDA executor: AOTInductor packages on the GPU, decode replayed from CUDA graphs.

Load does no compiling: the packages hold their cubins, the weights are copied from the
bundle's safetensors to the GPU once and handed to both programs. When the engine binds
its KV pool, one CUDA graph is captured per decode bucket of the manifest (1, 2, 4, 8,
16, ...); a decode step pads its batch up to the next bucket, copies one small host
buffer in (tokens, positions, slots, page table) and replays the graph, which runs the
paged-decode program and writes the new K/V into the pool. Prefill chunks are replayed
from graphs too, one per (rows, tokens, past) bucket (runtime/prefill_graphs.py); calls
no bucket holds run the prefill program directly. ARLE_PREFILL_GRAPHS=0 sends every
chunk to the program directly (for comparisons).

A bundle may hold a second decode program, decode_fused (small batches, fewer and
larger kernels; targets/cuda.py): its graphs are captured too, every graph's replay is
timed, and each batch size runs on the fastest (program, bucket) that fits.
ARLE_FUSED_DECODE=0 leaves decode_fused out (for comparisons).
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
from .prefill_graphs import PrefillGraphs, prefill_buckets, time_replays

log = logging.getLogger("arle.cuda")

# Host buffer columns: token, position (= past length), slot for the new K/V, row of the feed
# buffer holding the token instead (-1: the token column; the engine's lookahead), row of
# the linear-attention state pool (hybrid models), page table...
_TOKEN, _POS, _SLOT, _FEED, _STATE, _TABLE = 0, 1, 2, 3, 4, 5
FEED_ROWS = 1 << 14  # sampled tokens a step can leave on the device (the engine's running set)


class CudaGraphExecutor(AotiExecutor):
    paged = True
    program_names = ("prefill", "decode_paged")
    dense_decode_program = "prefill"  # one token over a dense past (verify, the reference loop)
    # A prefill call of a few hundred tokens is bound by weight reads and kernel launches,
    # not FLOPs: rows padded by up to a quarter cost less than a call of their own.
    prefill_padding_limit = 1.25
    # Default prompt tokens per engine step: 16 prompts of 128 share one call in ~7 ms warm on
    # an H100 (3 ms for one), so a burst is prefilled in a few steps instead of one chunk each.
    prefill_token_budget = 2048

    def __init__(self, bundle: Bundle):
        problem = libstdcxx_problem()
        if problem:
            raise ArleError(problem)
        device = torch.device("cuda", torch.cuda.current_device())
        weights = {n: t.to(device, non_blocking=True) for n, t in bundle.weights.items()}
        manifest_programs = bundle.manifest["programs"]
        fused = "decode_fused" in manifest_programs and os.environ.get("ARLE_FUSED_DECODE", "1") != "0"
        self.program_names = ("prefill", "decode_paged") + (("decode_fused",) if fused else ())
        # single-threaded runners: no container lock around run, which CUDA graph capture needs.
        super().__init__(bundle, device, weights, single_threaded=True)
        decode = manifest_programs["decode_paged"]
        self.decode_buckets = sorted(bundle.manifest["buckets"]["decode_batch_sizes"])
        # decode program -> the largest batch it takes
        self.decode_programs = {"decode_paged": self.decode_buckets[-1]}
        if fused:
            self.decode_programs["decode_fused"] = manifest_programs["decode_fused"]["batch"][1]
        self.page_size = decode["page_size"]
        self.table_width = decode["page_table_width"]
        self._inputs: dict[int, torch.Tensor] = {}  # bucket -> its graphs' device input buffer
        self._k_pool: torch.Tensor | None = None  # bind_kv_pool
        # (program, bucket) -> (graph or None when graphs are off, its logits output)
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        # Two pinned input buffers taking turns: with the engine's lookahead a step's inputs
        # are written while the previous step's copy may not have run yet.
        self._hosts = [torch.zeros(self.decode_buckets[-1], _TABLE + self.table_width, dtype=torch.long).pin_memory()
                       for _ in range(2)]
        self._hosts_np = [h.numpy() for h in self._hosts]  # same memory; numpy row writes cost far less than torch's
        self._turn = 0
        self._feed = torch.zeros(FEED_ROWS, dtype=torch.long, device=device)
        self.graph_capture_s = 0.0
        self.prefill_warmup_s = 0.0
        self.prefill_graphs: PrefillGraphs | None = None  # bind_kv_pool
        self.prefill_graphs_off = ""  # why there are none, when there are none
        self._sharded = "tensor_parallel" in bundle.manifest
        self.route: dict[int, tuple[str, int]] = {}  # batch size -> (program, bucket), from measured replay times
        self.replay_ms: dict[tuple[str, int], float] = {}
        self._forced: str | None = None  # run_only(): every batch on one program
        self._state: tuple[torch.Tensor, ...] = ()  # hybrid models: bind_state_pool
        self._state_scratch = 0
        # ARLE_CUDA_GRAPHS=0 runs the same decode program without graphs (for profiling);
        # "lazy" captures a bucket's graphs when a batch first needs it (`arle-runtime run`:
        # one prompt needs one bucket, and a cold start should not wait for the rest).
        mode = os.environ.get("ARLE_CUDA_GRAPHS", "1")
        self.use_graphs = mode != "0"
        self.lazy = mode == "lazy"

    # --- the paged decode path ----------------------------------------------------------

    @property
    def lookahead_capable(self) -> bool:
        """Whether the engine may feed decode tokens from the device (engine/lookahead.py):
        not on a tensor-parallel rank, whose peers get each step's tokens from the host."""
        return not self._sharded

    def bind_state_pool(self, state: tuple[torch.Tensor, ...], scratch_row: int) -> None:
        """A hybrid model's linear-attention state pool ([Llin, rows, ...] per tensor): each
        decode graph reads its rows' state and writes it back; padded rows use scratch_row.
        Call before bind_kv_pool, which captures the graphs."""
        self._state, self._state_scratch = state, scratch_row

    def set_feed(self, tokens: torch.Tensor) -> None:
        """Keep a step's sampled tokens [n] on the device for the next decode to read."""
        if tokens.numel() > FEED_ROWS:
            raise ArleError(f"A step sampled {tokens.numel()} tokens; the feed buffer holds {FEED_ROWS}.")
        self._feed[: tokens.numel()].copy_(tokens)

    def bind_kv_pool(self, k_pool: torch.Tensor, v_pool: torch.Tensor, scratch_slot: int) -> None:
        """Capture one graph per decode bucket and program over this pool; padded rows
        write their K/V into scratch_slot, which no sequence owns."""
        import time

        started = time.perf_counter()
        self._k_pool, self._v_pool, self._scratch = k_pool, v_pool, scratch_slot
        self._graphs.clear()
        self.prefill_graphs = None  # the old pool's: let their memory go before capturing anew
        self._pool = torch.cuda.graph_pool_handle()
        for bucket in sorted(self.decode_buckets, reverse=True):  # largest first: the rest reuse its memory
            inputs = torch.zeros(bucket, _TABLE + self.table_width, dtype=torch.long, device=self.device)
            inputs[:, _SLOT] = scratch_slot
            inputs[:, _STATE] = self._state_scratch
            self._inputs[bucket] = inputs
            if self.lazy:
                continue
            for program, largest in self.decode_programs.items():
                if bucket <= largest:
                    self._capture(program, bucket)
        torch.cuda.synchronize()
        # Tensor-parallel ranks must replay the same bucket (their graphs hold paired
        # all-reduces), and timings differ per card: they take the smallest that fits.
        self.route = self._route_by_replay_time() if self.use_graphs and not self.lazy and not self._sharded else {}
        self.graph_capture_s = time.perf_counter() - started
        # A tensor-parallel shard would need its peers in step (untested: no multi-GPU machine).
        sharded = self._sharded
        started = time.perf_counter()
        self.prefill_graphs = self._capture_prefill_graphs()
        if self.prefill_graphs is None and os.environ.get("ARLE_PREFILL_WARMUP", "1") != "0" and not sharded \
                and not self.lazy:
            self.warm_prefill()  # the graphs' capture warms the same calls up
        self.prefill_warmup_s = time.perf_counter() - started
        if self.prefill_graphs is not None:
            log.info("prefill graphs: %d buckets captured in %.2f s", len(self.prefill_graphs.buckets),
                     self.prefill_warmup_s)
        else:
            log.info("no prefill graphs (%s): prompts call the prefill program directly", self.prefill_graphs_off)

    def _capture_prefill_graphs(self) -> PrefillGraphs | None:
        """The prefill graphs over the bound pool, or None (with the reason in
        prefill_graphs_off): not for a one-prompt `run` (lazy: one call would pay for the
        capture), tensor-parallel ranks, hybrid models (their recurrent state would need its
        own pool writes) or with graphs off."""
        off = {"ARLE_CUDA_GRAPHS=0": not self.use_graphs, "lazy capture": self.lazy,
               "tensor-parallel rank": self._sharded, "hybrid model": self.config.is_hybrid,
               "ARLE_PREFILL_GRAPHS=0": os.environ.get("ARLE_PREFILL_GRAPHS", "1") == "0"}
        self.prefill_graphs_off = next((why for why, applies in off.items() if applies), "")
        if self.prefill_graphs_off:
            return None
        limits = self.limits
        budget = max(limits.max_prefill_tokens, self.prefill_token_budget)
        graphs = PrefillGraphs(self._programs["prefill"], self._k_pool, self._v_pool, self._scratch, self.cache_shape,
                               self.compute_dtype,
                               prefill_buckets(limits.max_batch, limits.max_prefill_tokens, budget, limits.max_context),
                               pool=self._pool)
        try:
            graphs.capture()
        except Exception as e:  # noqa: BLE001 - serving works without them; say so loudly
            self.prefill_graphs_off = f"capture failed: {type(e).__name__}: {e}"
            log.warning("prefill graphs were not captured (%s); prefill chunks call the program directly",
                        self.prefill_graphs_off)
            torch.cuda.synchronize()
            return None
        return graphs

    def _capture(self, program: str, bucket: int) -> None:
        """The graph of `program` at batch `bucket` (or, with graphs off, its warm-up only)."""
        inputs = self._inputs[bucket]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside capture (lazy init, allocator)
                self._paged_step(inputs, program)
        torch.cuda.current_stream().wait_stream(side)
        if not self.use_graphs:
            self._graphs[program, bucket] = (None, None)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._paged_step(inputs, program)
        self._graphs[program, bucket] = (graph, logits)

    def _route_lazily(self, n: int) -> tuple[str, int]:
        """With lazy capture: the graphs of the smallest bucket that fits `n`, captured on
        first use, and the faster program there (timed as at a full capture)."""
        bucket = self.decode_buckets[bisect.bisect_left(self.decode_buckets, n)]
        programs = [p for p, largest in self.decode_programs.items() if bucket <= largest
                    and (self._forced is None or p == self._forced)]
        for program in programs:
            if (program, bucket) not in self._graphs:
                self._capture(program, bucket)
        if self.use_graphs and len(programs) > 1:
            for program in programs:
                self.replay_ms[program, bucket] = self.replay_time_ms(bucket, 10, program)
            program = min(programs, key=lambda p: (round(self.replay_ms[p, bucket], 2), p != "decode_paged"))
        else:
            program = programs[0]
        self.route[n] = (program, bucket)
        return program, bucket

    def warm_prefill(self, tokens_per_row: int = 128) -> None:
        """Run the prefill program once for 1, 2, 4, ... rows of 128 tokens, up to a step's
        prompt budget, before serving: a process's first prefill call paid ~0.85 s on an
        H100 (CUDA library set-up), and each size's first call loads the cuBLAS kernels
        its row count picks."""
        limits = self.limits
        width = min(tokens_per_row, limits.max_prefill_tokens)
        budget = max(limits.max_prefill_tokens, self.prefill_token_budget)
        rows = 1
        while rows <= limits.max_batch and rows * width <= budget:
            ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
            positions = torch.arange(width, device=self.device).expand(rows, width).contiguous()
            empty = torch.zeros(self.cache_shape(rows, 0), dtype=self.compute_dtype, device=self.device)
            zeros = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.prefill(ids, positions, empty, empty, zeros, zeros + width - 1, *self.empty_state(rows))
            rows *= 2
        torch.cuda.synchronize()

    def _route_by_replay_time(self, replays: int = 10) -> dict[int, tuple[str, int]]:
        """Batch size -> the (program, bucket) whose graph decodes it fastest. A bigger
        bucket can be faster than the smallest one that fits: cuBLAS picks its kernels by
        M, and on the H200 a Qwen3-0.6B step measured 1.48 ms at batch 1 but 1.22 ms at
        batch 16. Timed here, on this card, with the real pool (~10 replays per graph)."""
        ms = {key: self.replay_time_ms(key[1], replays, key[0]) for key in self._graphs}
        self.replay_ms = ms
        route = {}
        for n in range(1, self.decode_buckets[-1] + 1):
            fits = [key for key in ms if key[1] >= n and (self._forced is None or key[0] == self._forced)]
            # ties (within 10 us) go to the smaller bucket, then to decode_paged
            route[n] = min(fits, key=lambda key: (round(ms[key], 2), key[1], key[0] != "decode_paged"))
        log.info("decode graph replay ms: %s", {f"{p}/{b}": round(t, 3) for (p, b), t in sorted(ms.items())})
        return route

    def run_only(self, program: str | None) -> None:
        """Send every batch to one decode program (None: the fastest again), e.g. so that
        `arlec verify` checks each program's tokens."""
        if program is not None and program not in self.decode_programs:
            raise ArleError(f"This bundle has no {program} program.")
        self._forced = program
        if self.lazy:
            self.route = {}
        elif self.use_graphs and self._graphs:
            self.route = self._route_by_replay_time()

    def replay_time_ms(self, bucket: int, replays: int = 10, program: str | None = None) -> float:
        """GPU time of one decode step of `bucket` (on `program`, else the one batch
        `bucket` is routed to): replays queued back to back, so the host never holds the
        GPU up (the engine's per-token time minus this is host work)."""
        if program is None:
            timed = [key for key in self.replay_ms if key[1] == bucket]
            program = min(timed, key=self.replay_ms.get)[0] if timed else "decode_paged"
        return time_replays(self._graphs[program, bucket][0], replays)

    def _paged_step(self, inputs: torch.Tensor, program: str = "decode_paged") -> torch.Tensor:
        # Every program input contiguous: AOTInductor assumes the strides it was compiled
        # with and does not check them (a column slice here once fed row 0's slot number
        # to row 1 as its token id).
        # clone, not contiguous(): a one-row bucket's column slice is already contiguous but
        # 8 bytes into the buffer, and a misaligned input makes the program copy it per call.
        feed = inputs[:, _FEED]
        tokens = torch.where(feed >= 0, self._feed[feed.clamp(min=0)], inputs[:, _TOKEN])[:, None]
        positions = inputs[:, _POS : _POS + 1].clone()
        past_lens = inputs[:, _POS].to(torch.int32)
        table = inputs[:, _TABLE:].to(torch.int32)
        rows = inputs[:, _STATE]
        state = tuple(pool[:, rows] for pool in self._state)
        logits, new_k, new_v, *state = self._programs[program](
            tokens, positions, self._k_pool, self._v_pool, table, past_lens, *state)
        for pool, new in zip(self._state, state):
            pool[:, rows] = new.to(pool.dtype)
        slots = inputs[:, _SLOT]
        self._k_pool[:, slots] = to_pool_dtype(new_k, self._k_pool.dtype)
        self._v_pool[:, slots] = to_pool_dtype(new_v, self._v_pool.dtype)
        return logits

    def decode_paged(self, tokens: list[int], positions: list[int], slots: list[int], page_tables: list[list[int]],
                     feed: list[int] | None = None, state_slots: list[int] | None = None):
        """Logits [n, V] for n sequences decoding one token each; writes their K/V into the
        pool. With `feed`, row i's token is the feed buffer's row feed[i] (set_feed); a
        hybrid model's rows read and write their state rows `state_slots`."""
        n = len(tokens)
        if self._k_pool is None:  # lazy capture leaves _graphs empty until a batch needs one
            raise ArleError("decode_paged needs bind_kv_pool first.")
        if not 1 <= n <= self.decode_buckets[-1]:
            raise ArleError(f"A batch of {n} is outside this bundle's range 1..{self.decode_buckets[-1]}.")
        if n in self.route:
            program, bucket = self.route[n]
        elif self.lazy:
            program, bucket = self._route_lazily(n)
        else:
            program = self._forced or "decode_paged"
            bucket = self.decode_buckets[bisect.bisect_left(self.decode_buckets, n)]
            if bucket > self.decode_programs[program]:
                program = "decode_paged"
        graph, logits = self._graphs[program, bucket]
        inputs = self._inputs[bucket]
        if max(positions) + 1 > self.limits.max_context:
            raise ArleError(
                f"The sequence would reach {max(positions) + 1} tokens, past this bundle's context of "
                f"{self.limits.max_context}."
            )
        self._turn ^= 1
        host = self._hosts_np[self._turn][:bucket]
        host.fill(0)
        host[:, _SLOT] = self._scratch
        host[:, _FEED] = -1
        host[:, _STATE] = self._state_scratch
        host[:n, _POS], host[:n, _SLOT] = positions, slots
        if state_slots is not None:
            host[:n, _STATE] = state_slots
        if feed is None:
            host[:n, _TOKEN] = tokens
        else:
            host[:n, _FEED] = feed
        for row, table in enumerate(page_tables):
            host[row, _TABLE : _TABLE + len(table)] = table
        inputs.copy_(self._hosts[self._turn][:bucket], non_blocking=True)
        if graph is None:
            return self._paged_step(inputs, program)[:n]
        graph.replay()
        return logits[:n].clone()
