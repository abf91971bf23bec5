"""The engine's host work per step, with the model taken out.

On the H200 a batch-64 decode step is 1.40 ms of GPU work, yet the server delivered 64
tokens every ~14 ms (docs/perf/cuda-h200.md): the rest is Python on the host. This
benchmark runs the real engine (scheduler, page manager, model runner, sampler, stop
checks, detokenizer) and the CUDA executor's own host code (bucket routing, the pinned
input buffer) over a stand-in whose "forward pass" costs next to nothing, so what it
measures is the host time that sits between two GPU steps. It runs on any CPU.

    python benchmarks/engine_host.py build/smollm2-135m-instruct-int8-cpu.arle --out docs/perf/engine-host.json
    python benchmarks/engine_host.py build/smollm2-135m-instruct-int8-cpu.arle --server --out docs/perf/engine-host-server.json

The bundle only lends its tokenizer and name (detokenizing is part of the host work).
Each engine point is the best of `--repeats` runs; `--profile` prints where the time
goes. `--server` starts `arle-runtime serve`'s own app in a subprocess over the same
stand-in (the engine in a process of its own, as `serve` runs it; `--one-process` keeps it
in the server's) and drives it with benchmarks/serve_load.py's closed-loop streaming client:
output tok/s there is what the HTTP layer and the engine together can feed per second
when the GPU costs nothing (on 2 cores the client competes for the CPU; compare runs of
the same machine only).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

from arle_runtime.bundle import load_bundle  # noqa: E402
from arle_runtime.cuda_executor import _FEED, _POS, _TABLE, _TOKEN, FEED_ROWS, CudaGraphExecutor  # noqa: E402
from arle_runtime.engine import Engine, EngineConfig  # noqa: E402
from arle_runtime.executor import StepLimits  # noqa: E402
from arle_runtime.sampler import SamplingParams  # noqa: E402


class HostOnlyExecutor(CudaGraphExecutor):
    """The CUDA executor's host side with the programs replaced by a next-token rule
    (token * 31 + position) % vocab, so every sequence emits a varied, reproducible
    stream of real token ids. The KV layout is tiny: pool writes cost ~nothing. The
    logits span only the first `vocab` ids (4096 real tokens of the tokenizer): on a GPU
    the argmax over 150k columns is a 10 us kernel, on this CPU it would be most of the
    step, and it is not the host work this measures."""

    def __init__(self, vocab: int = 4096, max_batch: int = 64, max_prefill: int = 512, max_context: int = 4096,
                 gpu_ms: float = 0.0):
        self.gpu_s = gpu_ms / 1000  # a sleep per decode step, standing for the wait on the GPU (GIL released)
        self.limits = StepLimits(max_batch, max_prefill, max_context)
        self.kv_dtype = self.compute_dtype = torch.float32
        self.device = torch.device("cpu")
        self.config = None
        self._cache_dims = (1, 1, 8)
        self.vocab = vocab
        self.decode_buckets = [1, 2, 4] + list(range(8, max_batch + 1, 8))
        self.page_size = 16
        self.table_width = -(-max_context // self.page_size)
        self._hosts = [torch.zeros(self.decode_buckets[-1], _TABLE + self.table_width, dtype=torch.long)
                       for _ in range(2)]
        self._hosts_np = [h.numpy() for h in self._hosts]
        self._turn, self._sharded = 0, False
        self._state, self._state_scratch = (), 0
        self._feed = torch.zeros(FEED_ROWS, dtype=torch.long)
        self.route, self.use_graphs, self.lazy, self.model_s = {}, False, False, 0.0
        self._k_pool = None
        self.decode_programs = {"decode_paged": max_batch}
        self._forced = None
        self._graphs, self._inputs = {}, {}

    def empty_state(self, batch: int):
        return ()

    def bind_kv_pool(self, k_pool, v_pool, scratch_slot):
        self._k_pool, self._v_pool, self._scratch = k_pool, v_pool, scratch_slot
        self._inputs = {b: torch.zeros(b, _TABLE + self.table_width, dtype=torch.long) for b in self.decode_buckets}
        self._graphs = {("decode_paged", b): (None, None) for b in self.decode_buckets}

    def _next_logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        nxt = (tokens * 31 + positions) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        self.model_s += time.perf_counter() - started
        return logits

    def _paged_step(self, inputs, program="decode_paged"):
        if self.gpu_s:
            time.sleep(self.gpu_s)
        feed = inputs[:, _FEED]
        tokens = torch.where(feed >= 0, self._feed[feed.clamp(min=0)], inputs[:, _TOKEN])
        return self._next_logits(tokens, inputs[:, _POS])

    def prefill(self, tokens, positions, past_k, past_v, past_lens, last_index, *state):
        rows = torch.arange(tokens.shape[0])
        logits = self._next_logits(tokens[rows, last_index], positions[rows, last_index])
        new = torch.zeros(1, tokens.shape[0], 1, tokens.shape[1], 8)
        return logits, new, new.clone()


def run_once(tokenizer, batch: int, prompt_len: int, new_tokens: int, profile: bool = False) -> dict:
    executor = HostOnlyExecutor()
    engine = Engine(executor, tokenizer, (), EngineConfig(max_batch=64, kv_pages=batch * (prompt_len + new_tokens) // 16 + 64))
    rng = random.Random(batch)
    prompts = [[rng.randrange(200, 49000) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for rid, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=rid)
    while any(s.num_computed == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the prefills; what follows are decode steps only
    executor.model_s = 0.0
    steps, tokens = 0, 0
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    while engine.has_work:
        tokens += sum(out.token is not None for out in engine.step())
        steps += 1
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - started
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(35)
    host_ms = (wall - executor.model_s) / steps * 1000
    return {"batch": batch, "decode_steps": steps, "tokens": tokens,
            "host_ms_per_step": round(host_ms, 3), "host_us_per_token": round(host_ms * 1000 / batch, 1),
            "stand_in_ms_per_step": round(executor.model_s / steps * 1000, 3)}


def stand_in_session(bundle_path: Path, gpu_ms: float):
    """A Session over the stand-in executor (made in the engine's process)."""
    from arle_runtime.session import Session

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_path, verify=False)
    return Session(bundle, HostOnlyExecutor(gpu_ms=gpu_ms), None, EngineConfig(max_batch=64, kv_pages=64 * 4096 // 16))


def serve_stand_in(bundle_path: Path, port: int, gpu_ms: float, one_process: bool, http_processes: int = 1) -> None:
    """The server subprocess: `arle-runtime serve`'s app over the stand-in executor, the
    engine in a process of its own as `serve` runs it (or in the server's, --one-process;
    or behind several HTTP processes, --http-processes)."""
    from arle_runtime.engine_process import RemoteSession
    from arle_runtime.http_processes import serve_processes
    from arle_runtime.server import serve

    open_session = partial(stand_in_session, bundle_path, gpu_ms)
    if http_processes > 1:
        return serve_processes(bundle_path, open_session, http_processes, "127.0.0.1", port, log_level="warning")
    session = open_session() if one_process else RemoteSession.start(bundle_path, open_session)
    serve(session, port=port, log_level="warning")


def process_cpu_s(pid: int, children: bool = True) -> float:
    """User + system CPU seconds a process (and its children) have used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if children:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += sum(process_cpu_s(int(child)) for child in (task / "children").read_text().split())
    return total


def server_points(bundle_path: Path, levels: list[int], prompt_tokens: int, new_tokens: int, gpu_ms: float,
                  one_process: bool, client_processes: int = 1, http_processes: int = 1) -> list[dict]:
    from serve_load import Server, SpreadClients, free_port, prompt_texts, summarize

    port = free_port()
    command = [sys.executable, __file__, str(bundle_path), "--serve-port", str(port), "--gpu-ms", str(gpu_ms),
               *(["--one-process"] if one_process else []), "--http-processes", str(http_processes)]
    server = Server("arle", command, port, dict(os.environ), Path("/tmp/arle-engine-host-serve.log"))
    tokenizer = load_bundle(bundle_path, verify=False).tokenizer
    points = []

    server.start()
    clients = SpreadClients(client_processes)
    try:
        server.wait_ready_blocking()
        for c in levels:
            prompts = prompt_texts(tokenizer, 4 * c, prompt_tokens)
            clients.level(server.base, server.model, prompts[:c], c, 8)  # warm-up burst
            cpu_before, http_before = process_cpu_s(server.proc.pid), process_cpu_s(server.proc.pid, False)
            records, wall, client_stats = clients.level(server.base, server.model, prompts, c, new_tokens)
            cpu = process_cpu_s(server.proc.pid) - cpu_before
            http = process_cpu_s(server.proc.pid, False) - http_before
            s = summarize(records, wall, c)
            tokens = s["output_tok_s"] * wall
            points.append({"concurrency": c, "output_tok_s": round(s["output_tok_s"], 1),
                           # less sensitive to a busy machine than tok/s: the server's own CPU time
                           "server_cpu_us_per_token": round(cpu / max(tokens, 1) * 1e6, 1),
                           # of which the HTTP process's (all of it with --one-process; with several
                           # HTTP processes they are children like the engine's, so not split out)
                           "http_process_cpu_us_per_token": round(http / max(tokens, 1) * 1e6, 1)
                           if http_processes == 1 else None,
                           "itl_ms_p50": round(s["itl_ms"]["p50"], 3), "ttft_ms_p50": round(s["ttft_ms"]["p50"], 2),
                           "errors": s["errors"], "requests": s["requests"], **client_stats})
            print(f"server c{c}: {points[-1]}")
    finally:
        clients.close()
        server.stop()
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="any bundle; only its tokenizer is used")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the batch-64 run")
    parser.add_argument("--server", action="store_true", help="also measure through the HTTP server")
    parser.add_argument("--levels", default="16,64", help="server concurrency levels")
    parser.add_argument("--gpu-ms", type=float, default=0.0,
                        help="server: sleep this long per decode step, as a wait on the GPU would (GIL released)")
    parser.add_argument("--one-process", action="store_true",
                        help="server: the engine in the server's process (serve --one-process), not its own")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="server: load-client processes (one caps near its own ~170 us of CPU per token)")
    parser.add_argument("--http-processes", type=int, default=1,
                        help="server: HTTP processes in front of the engine process (serve --http-processes)")
    parser.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.serve_port:
        return serve_stand_in(args.bundle, args.serve_port, args.gpu_ms, args.one_process, args.http_processes)
    torch.set_num_threads(1)
    tokenizer = load_bundle(args.bundle, verify=False).tokenizer
    points = []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = [run_once(tokenizer, batch, args.prompt_tokens, args.new_tokens) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["host_ms_per_step"])
        best["host_ms_per_step_runs"] = [r["host_ms_per_step"] for r in runs]
        points.append(best)
        print(f"batch {batch:3d}: host {best['host_ms_per_step']:.3f} ms/step "
              f"({best['host_us_per_token']:.1f} us/token), stand-in {best['stand_in_ms_per_step']:.3f} ms/step")
    if args.profile:
        run_once(tokenizer, 64, args.prompt_tokens, args.new_tokens, profile=True)
    server = []
    if args.server:
        server = server_points(args.bundle, [int(c) for c in args.levels.split(",")], args.prompt_tokens, args.new_tokens,
                               args.gpu_ms, args.one_process, args.client_processes, args.http_processes)
    if args.out:
        result = {"machine": cpu_name(), "torch": torch.__version__, "threads": 1,
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                  "gpu_ms": args.gpu_ms, "engine_process": not args.one_process,
                  "http_processes": args.http_processes, "command": "python " + " ".join(sys.argv),
                  "engine": points, "server": server}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
