"""Output tok/s, TTFT and inter-token latency of `arle-runtime serve` next to llama.cpp's server, under load.

    arlec build --quant int8 --max-batch 16 --out build/serve-int8.arle
    python benchmarks/serve_load.py --bundle build/serve-int8.arle [--concurrency 1,4,16] [--threads 2] \\
        [--prompt-tokens 128] [--max-tokens 64] [--only arle|llama.cpp] [--smoke] [--out FILE.json] [--plot FILE.png]

Needs llama-cpp-python's server extra (fastapi, sse-starlette, starlette-context,
pydantic-settings) and matplotlib for --plot.

Both servers run on loopback, each started here as a subprocess on a free port with the
same thread count (--threads, default 2), and both stay up for the whole run:

  arle       `arle-runtime serve BUNDLE --port P --max-batch 16` with ARLE_THREADS (and OMP/MKL threads)
             set to --threads; BUNDLE should be an int8 build of the default model
  llama.cpp  `python -m llama_cpp.server` (llama-cpp-python's server) on the Q8_0 GGUF derived from
             the shipped one (benchmarks/cpu_decode.py's derive step, kept in --gguf-cache); it runs one
             request at a time (no batching), so the settings are the ones that serve one stream
             fastest: --logits_all False (logits of the last position only), --interrupt_requests False
             (by default a new request cuts off the one streaming), --flash_attn True (at 16 clients
             62-73 tok/s against 53-54 without, in trials on the 2-core machine; alike at 1 client)
             and n_threads = n_threads_batch

The load generator (asyncio + httpx, in this process: ~170 us of CPU per streamed token, so
it is not the limit at the CPU servers' few hundred tok/s; `SpreadClients` spreads it over
processes for the GPU harness) is closed-loop: at concurrency N, N
clients each send a streaming POST /v1/completions, read it to the end and send the next,
until the level's requests are done (max(--min-requests, --requests-per-client x N)). The
levels are interleaved: at each level arle runs, then llama.cpp, so slow drifts of the
machine's load hit both alike. Before the levels each server gets an unmeasured warm-up
burst (one short request per client at the highest concurrency).

Every request has a prompt of its own: a --prompt-tokens window of benchmarks/data/perplexity.txt
(tokenized by the model's tokenizer, read cyclically), each starting at a different token, decoded
back to text. No two prompts share a first token position, so neither server's prefix reuse
applies (arle's usage reports the cached tokens; the JSON records them). Decoding is greedy
(temperature 0, repeat_penalty 1 for llama.cpp) with max_tokens = --max-tokens; the prompts
continue a text, so requests run to the length limit (finish reasons are recorded).

Per level and server: output tok/s = generated tokens / wall time of the level; TTFT = send to
the first streamed text; inter-token latency (ITL) = gaps between later streamed text chunks
(one token each, except where a token completes no character); p50/p99 over all requests.
Generated tokens come from the stream's usage (arle, stream_options.include_usage), else
max_tokens for requests that ended with "length", else the number of text chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from cpu_decode import PROMPT_TEXT, derived_gguf, load_average, machine_info, model_tokenizer, package_version, thread_env

from arle_runtime.bundle import sha256_file

SERVERS = ("arle", "llama.cpp")
READY_TIMEOUT_S = 600.0


# ---------------------------------------------------------------- prompts


def prompt_texts(tokenizer, count: int, length: int) -> list[str]:
    """`count` texts of about `length` tokens, windows of the fixed text read cyclically,
    each starting at a different token (evenly spread), so none is a prefix of another."""
    ids = tokenizer.encode(PROMPT_TEXT.read_text(), add_special_tokens=False).ids
    if count > len(ids):
        raise SystemExit(f"{count} prompts need distinct start tokens, but {PROMPT_TEXT} has {len(ids)} tokens.")
    ring = ids * (-(-(length + len(ids)) // len(ids)))
    starts = [i * len(ids) // count for i in range(count)]
    return [tokenizer.decode(ring[s : s + length]) for s in starts]


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, args, port: int, gguf: Path | None) -> list[str]:
    if name == "arle":
        exe = Path(sys.executable).with_name("arle-runtime")
        return [str(exe), "serve", str(args.bundle), "--port", str(port), "--max-batch", str(args.max_batch)]
    t = str(args.threads)
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(args.n_ctx), "--n_batch", "512", "--n_ubatch", "512", "--n_threads", t, "--n_threads_batch", t,
            "--logits_all", "False", "--interrupt_requests", "False", "--flash_attn", str(args.llama_flash_attn),
            "--verbose", "False"]


class Server:
    """One server subprocess: started, waited for, stopped; its output goes to a log file."""

    def __init__(self, name: str, command: list[str], port: int, env: dict, log_path: Path):
        self.name, self.command, self.port, self.env, self.log_path = name, command, port, env, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.model: str | None = None
        self.load_s: float | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        """Until the server answers (arle: /readyz, after its own warm-up; llama.cpp: /v1/models)."""
        t0 = time.perf_counter()
        probe = "/readyz" if self.name == "arle" else "/v1/models"
        while time.perf_counter() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(self.base + probe, timeout=5)).status_code == 200:
                    models = (await client.get(self.base + "/v1/models", timeout=5)).json()
                    self.model = models["data"][0]["id"]
                    self.load_s = time.perf_counter() - t0
                    return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def wait_ready_blocking(self) -> None:
        """wait_ready from synchronous code (the harnesses whose clients run in SpreadClients)."""
        async def go():
            async with httpx.AsyncClient(timeout=600) as client:
                await self.wait_ready(client)

        asyncio.run(go())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


# ---------------------------------------------------------------- load


def server_timing(header: str) -> dict[str, float]:
    """`parse;dur=0.41, queue;dur=1.2` -> {"parse": 0.41, "queue": 1.2} (ms)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        with contextlib.suppress(ValueError):
            out[name] = float(dur)
    return out


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "repeat_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    rec = {"ttft_s": None, "accepted_s": None, "server_ms": {}, "gaps_s": [], "chunks": 0, "usage": None, "finish_reason": None,
           "error": None}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", server.base + "/v1/completions", json=body) as r:
            # the response's headers: the request is parsed, tokenized and queued in the engine
            rec["accepted_s"] = time.perf_counter() - t0
            rec["server_ms"] = server_timing(r.headers.get("server-timing", ""))
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (pings)
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec["error"] = str(event["error"])[:200]
                    continue
                if event.get("usage"):
                    rec["usage"] = event["usage"]
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        now = time.perf_counter()
                        if last is None:
                            rec["ttft_s"] = now - t0
                        else:
                            rec["gaps_s"].append(now - last)
                        last = now
                        rec["chunks"] += 1
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
    except (httpx.HTTPError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
    rec["e2e_s"] = time.perf_counter() - t0
    if rec["error"] is None and rec["ttft_s"] is None:
        rec["error"] = "no text streamed"
    if rec["usage"] is not None:
        rec["tokens"], rec["token_count_from"] = rec["usage"]["completion_tokens"], "usage"
    elif rec["finish_reason"] == "length":
        rec["tokens"], rec["token_count_from"] = max_tokens, "finish_reason=length"
    else:
        rec["tokens"], rec["token_count_from"] = rec["chunks"], "chunks"
    return rec


async def run_level(client: httpx.AsyncClient, server: Server, prompts: list[str], concurrency: int,
                    max_tokens: int, desc: str | None) -> tuple[list[dict], float]:
    """Closed loop: `concurrency` clients take the next prompt as soon as their last request ends."""
    queue = list(reversed(prompts))
    records: list[dict] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="req", file=sys.stderr, leave=False) if desc else None

    async def client_loop():
        while queue:
            records.append(await one_request(client, server, queue.pop(), max_tokens))
            if bar:
                bar.update()

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    if bar:
        bar.close()
    return records, wall


class SpreadClients:
    """The closed-loop clients of a level spread over `processes` worker processes.

    One asyncio + httpx process spends ~170 us of CPU per streamed token (measured on the
    2-core machine, more than the server's HTTP process), so a single client process caps a
    fast server at a few thousand to ~13k tok/s and the figure measures the client. Each
    worker runs `concurrency / processes` clients over its share of the prompts, all starting
    at one moment; the level's wall time runs from that moment to the last worker's end.
    `client_cpu_busy` in `level()`'s stats is the workers' CPU over their wall time: near 1.0
    means the clients were saturated and the tok/s is a floor, not the server's ceiling."""

    def __init__(self, processes: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(_noop, range(processes)))  # start and import now, not inside a timed level

    def level(self, base: str, model: str, prompts: list[str], concurrency: int,
              max_tokens: int) -> tuple[list[dict], float, dict]:
        n = min(self.processes, concurrency)
        shares = [concurrency // n + (i < concurrency % n) for i in range(n)]
        start_at = time.monotonic() + 0.5  # CLOCK_MONOTONIC is system-wide: one start for all workers
        futures = [self.pool.submit(_worker_level, base, model, prompts[i::n], c, max_tokens, start_at)
                   for i, c in enumerate(shares)]
        parts = [f.result() for f in futures]
        records = [r for part in parts for r in part[0]]
        wall = max(part[1] for part in parts) - start_at
        cpu = sum(part[2] for part in parts)
        tokens = sum(r.get("tokens", 0) for r in records if r["error"] is None)
        return records, wall, {"client_processes": n, "client_cpu_us_per_token": round(cpu / max(tokens, 1) * 1e6, 1),
                               "client_cpu_busy": round(cpu / (wall * n), 2)}

    def close(self) -> None:
        self.pool.shutdown()


def _noop(_):
    return None


def _worker_level(base: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                  start_at: float) -> tuple[list[dict], float, float]:
    """One worker's share of a level: (records, monotonic end, CPU seconds)."""
    from types import SimpleNamespace

    async def go():
        limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            cpu0 = time.process_time()
            records, _ = await run_level(client, SimpleNamespace(base=base, model=model), prompts, concurrency,
                                         max_tokens, None)
            return records, time.monotonic(), time.process_time() - cpu0

    return asyncio.run(go())


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def median_ms(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarize(records: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in records if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok]
    gaps = [g for r in ok for g in r["gaps_s"]]
    tokens = sum(r["tokens"] for r in ok)
    cached = [r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in ok if r["usage"]]
    prompt_tokens = [r["usage"]["prompt_tokens"] for r in ok if r["usage"]]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_samples": [r["error"] for r in records if r["error"]][:3],
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99), "mean": float(np.mean(ttft)) * 1000 if ttft else None},
        # time to the response's headers, the part of TTFT spent before the engine had the request
        "accepted_ms": {"p50": pct([r["accepted_s"] for r in ok], 50)},
        # of which in the server's handler (its Server-Timing header): reading and parsing the
        # body and tokenizing; queueing in the engine (with the engine process's ack)
        "server_parse_ms": {"p50": median_ms([r["server_ms"].get("parse") for r in ok])},
        "server_queue_ms": {"p50": median_ms([r["server_ms"].get("queue") for r in ok])},
        "itl_ms": {"p50": pct(gaps, 50), "p99": pct(gaps, 99), "mean": float(np.mean(gaps)) * 1000 if gaps else None},
        "e2e_ms": {"p50": pct([r["e2e_s"] for r in ok], 50), "p99": pct([r["e2e_s"] for r in ok], 99)},
        "itl_samples": len(gaps),
        "finish_reasons": dict(Counter(str(r["finish_reason"]) for r in ok)),
        "token_count_from": dict(Counter(r["token_count_from"] for r in ok)),
        "prompt_tokens_reported": {"min": min(prompt_tokens), "max": max(prompt_tokens)} if prompt_tokens else None,
        "cached_prompt_tokens": sum(cached) if cached else None,
        # one row per request, in completion order: [ttft, longest gap, end-to-end] in ms, tokens
        "per_request": [[round(r["ttft_s"] * 1000, 1), round(max(r["gaps_s"], default=0) * 1000, 1),
                         round(r["e2e_s"] * 1000, 1), r["tokens"]] for r in ok],
    }


def wait_for_quiet(threshold: float, max_wait_s: float) -> dict:
    """Sleep while the 1-minute load average is above `threshold` (other work on the machine)."""
    t0 = time.monotonic()
    first = load_average()
    while (load := load_average()) and load[0] > threshold and time.monotonic() - t0 < max_wait_s:
        tqdm.write(f"load average {load[0]:.2f} > {threshold}; waiting ...", file=sys.stderr)
        time.sleep(30)
    return {"threshold": threshold, "load_before_wait": first, "waited_s": round(time.monotonic() - t0),
            "load_after_wait": load_average()}


async def run(args, servers: list[Server], prompts: list[str], levels: list[int]) -> dict:
    results: dict[str, list[dict]] = {s.name: [] for s in servers}
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        for server in servers:
            await server.wait_ready(client)
            tqdm.write(f"{server.name} ready on port {server.port} after {server.load_s:.1f} s (model {server.model!r})",
                       file=sys.stderr)
        warm_n = max(levels)
        for server in servers:
            records, _ = await run_level(client, server, prompts[:warm_n], warm_n, 8, None)
            bad = [r["error"] for r in records if r["error"]]
            if bad:
                raise RuntimeError(f"{server.name} failed its warm-up: {bad[0]}\n{server.log_tail()}")
        at = warm_n
        for c in levels:
            n = max(args.min_requests, args.requests_per_client * c)
            level_prompts, at = prompts[at : at + n], at + n  # the same for both servers, new to either
            for server in servers:
                await asyncio.sleep(args.pause)
                load_start = load_average()
                records, wall = await run_level(client, server, level_prompts, c, args.max_tokens,
                                                f"{server.name} c={c}")
                row = summarize(records, wall, c)
                row.update(load_average_at_start=load_start, load_average_at_end=load_average())
                results[server.name].append(row)
                tqdm.write(f"{server.name:>9} c={c:<3} {row['output_tok_s']:7.1f} tok/s  TTFT p50 "
                           f"{row['ttft_ms']['p50'] or 0:7.1f} ms  ITL p50 {row['itl_ms']['p50'] or 0:6.1f} ms  "
                           f"errors {row['errors']}", file=sys.stderr)
    return results


# ---------------------------------------------------------------- report


def ratios(results: dict) -> list[dict]:
    out = []
    for a, b in zip(results.get("arle", []), results.get("llama.cpp", [])):
        out.append({"concurrency": a["concurrency"],
                    "output_tok_s_arle_over_llama_cpp": a["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None})
    return out


def markdown_table(results: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"

    vs = {r["concurrency"]: r["output_tok_s_arle_over_llama_cpp"] for r in ratios(results)}
    lines = ["| server | concurrency | requests | errors | output tok/s | vs llama.cpp | TTFT p50 ms | TTFT p99 ms "
             "| ITL p50 ms | ITL p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(((r["concurrency"], name, r) for name, rs in results.items() for r in rs),
                  key=lambda t: (t[0], SERVERS.index(t[1])))
    for c, name, r in rows:
        ratio = f"{vs[c]:.2f}x" if name == "arle" and vs.get(c) else "-"
        lines.append(f"| {name} | {c} | {r['requests']} | {r['errors']} | {r['output_tok_s']:.1f} | {ratio} | "
                     f"{ms(r['ttft_ms']['p50'])} | {ms(r['ttft_ms']['p99'])} | {ms(r['itl_ms']['p50'])} | "
                     f"{ms(r['itl_ms']['p99'])} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("output tok/s", lambda r: r["output_tok_s"]), ("TTFT p50 (ms)", lambda r: r["ttft_ms"]["p50"]),
              ("inter-token latency p50 (ms)", lambda r: r["itl_ms"]["p50"])]
    for ax, (label, value) in zip(axes, panels):
        for name, rows in results.items():
            xs = [r["concurrency"] for r in rows]
            ax.plot(xs, [value(r) for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="arle bundle to serve (an int8 build of the default model)")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp; default: the Q8_0 file derived from the shipped one")
    ap.add_argument("--gguf-cache", type=Path, default=Path("build/bench-gguf"), help="where derived GGUF files are kept")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--min-requests", type=int, default=16, help="fewest requests in a level")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="threads for each server")
    ap.add_argument("--max-batch", type=int, default=16, help="arle-runtime serve --max-batch")
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp server context")
    ap.add_argument("--llama-flash-attn", default="True", choices=("True", "False"), help="llama.cpp server --flash_attn")
    ap.add_argument("--only", choices=SERVERS, default=None)
    ap.add_argument("--pause", type=float, default=3.0, help="seconds of quiet before each level")
    ap.add_argument("--quiet-load", type=float, default=0.7, help="wait before starting while the 1-min load is above this")
    ap.add_argument("--max-wait", type=float, default=1200.0, help="longest wait for a quiet machine, seconds")
    ap.add_argument("--log-dir", type=Path, default=Path("build/serve-load"), help="server logs")
    ap.add_argument("--smoke", action="store_true", help="concurrency 1,4 with 4 requests each")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of tok/s, TTFT and ITL against concurrency")
    args = ap.parse_args(argv)
    if args.smoke:
        args.concurrency, args.requests_per_client, args.min_requests = "1,4", 1, 4
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.bundle is None and args.only != "llama.cpp":
        ap.error("--bundle is required (unless --only llama.cpp)")

    from arlec.sources import default_model_path

    shipped = default_model_path()
    gguf = args.gguf or derived_gguf(shipped, args.gguf_cache, "Q8_0", args.threads)[0]
    names = [args.only] if args.only else list(SERVERS)
    total = max(levels) + sum(max(args.min_requests, args.requests_per_client * c) for c in levels)
    prompts = prompt_texts(model_tokenizer(shipped), total, args.prompt_tokens)

    quiet = wait_for_quiet(args.quiet_load, args.max_wait)
    info = machine_info(args.threads)
    info.update(quiet_wait=quiet, httpx=package_version("httpx"), fastapi=package_version("fastapi"),
                uvicorn=package_version("uvicorn"), starlette=package_version("starlette"))
    env = thread_env(args.threads)
    servers = []
    for name in names:
        port = free_port()
        servers.append(Server(name, server_command(name, args, port, gguf), port, env, args.log_dir / f"{name}.log"))
    print(f"{info['cpu']}, {args.threads} threads per server; load average {info['load_average_at_start']}", file=sys.stderr)
    print(f"{len(prompts)} prompts of ~{args.prompt_tokens} tokens, max_tokens {args.max_tokens}, levels {levels}",
          file=sys.stderr)
    try:
        for s in servers:
            s.start()
        results = asyncio.run(run(args, servers, prompts, levels))
    finally:
        for s in servers:
            s.stop()
    info["load_average_at_end"] = load_average()

    print(markdown_table(results))
    if args.out:
        report = {
            "benchmark": "serve_load",
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": info,
            "model": {"gguf_shipped": shipped.name, "sha256": sha256_file(shipped)},
            "servers": {s.name: {"command": shlex.join(s.command), "port": s.port, "model": s.model,
                                 "ready_after_s": s.load_s,
                                 "env": {k: env[k] for k in ("ARLE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
                        for s in servers},
            "llama_cpp_gguf": {"path": str(gguf), "sha256": sha256_file(gguf)} if "llama.cpp" in names else None,
            "arle_bundle": {"path": str(args.bundle),
                            "quantization": json.loads((args.bundle / "manifest.json").read_text()).get("quantization")}
            if "arle" in names else None,
            "workload": {"endpoint": "POST /v1/completions, stream: true", "levels": levels,
                         "requests_per_level": {c: max(args.min_requests, args.requests_per_client * c) for c in levels},
                         "prompt_tokens": args.prompt_tokens, "prompt_text": PROMPT_TEXT.name,
                         "prompt_text_sha256": sha256_file(PROMPT_TEXT), "max_tokens": args.max_tokens,
                         "decode": "greedy (temperature 0; repeat_penalty 1 for llama.cpp)",
                         "prompts": "distinct windows, no shared prefix", "warmup": f"{max(levels)} requests of 8 tokens",
                         "order": "levels ascending; at each level arle then llama.cpp", "smoke": args.smoke},
            "results": results,
            "ratios": ratios(results),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot, f"SmolLM2-135M int8 / Q8_0, {args.threads} threads, {info['cpu']}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r["errors"] == 0 for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
