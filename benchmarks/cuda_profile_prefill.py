"""Prefill program calls of a cuda bundle: the first call of each new shape against the
same shape once warm, and where a warm call's GPU time goes.

    python benchmarks/cuda_profile_prefill.py BUNDLE [--out prefill-profile.json] [--rows 30]

Calls the prefill program directly (no engine) with an empty past, for (rows, tokens)
shapes the engine sends when prompts of 128 tokens are admitted together, and longer
single chunks. Each shape is timed on its first call in this process and as the mean of
5 warm calls; beside it, on a GPU, the same call through the executor's prefill graphs
(runtime/prefill_graphs.py: the bucket it pads to, the mean of 5 warm calls with the host's
input copy, and the replay's GPU time alone). Then torch.profiler records kernels of warm
program calls at 8 x 128.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SHAPES = ((1, 128), (2, 128), (4, 128), (5, 128), (8, 128), (16, 128), (1, 512), (1, 2048), (3, 128), (12, 128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--rows", type=int, default=30, help="kernel rows in the profile table")
    parser.add_argument("--out")
    args = parser.parse_args()
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from arle_runtime.session import Session

    started = time.perf_counter()
    session = Session.open(args.bundle, verify=False)
    ex = session.executor
    dev = ex.device
    vocab = min(50000, session.tokenizer.get_vocab_size())
    graphs = engine = None
    if dev.type == "cuda":  # an engine binds a pool, which captures the prefill graphs
        from arle_runtime.engine import Engine, EngineConfig

        engine = Engine(ex, session.tokenizer, (), EngineConfig(max_batch=ex.limits.max_batch))
        graphs = ex.prefill_graphs
    out = {"bundle": session.bundle.name, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "command": "python " + " ".join(sys.argv),
           "open_s": round(time.perf_counter() - started, 2), "limits": vars(ex.limits), "shapes": []}
    on_gpu = dev.type == "cuda"  # the CPU runs it too, as a check of the script

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def call(rows: int, tokens: int):
        ids = torch.randint(3, vocab, (rows, tokens), device=dev)
        positions = torch.arange(tokens, device=dev).expand(rows, tokens).contiguous()
        empty = torch.zeros(ex.cache_shape(rows, 0), dtype=getattr(ex, "compute_dtype", ex.kv_dtype), device=dev)
        zeros = torch.zeros(rows, dtype=torch.long, device=dev)
        last = torch.full((rows,), tokens - 1, dtype=torch.long, device=dev)
        return lambda: ex.prefill(ids, positions, empty, empty, zeros, last)

    def timed(fn, n: int = 1) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n * 1000

    for rows, tokens in SHAPES:
        if rows > ex.limits.max_batch or tokens > ex.limits.max_prefill_tokens:
            continue
        fn = call(rows, tokens)
        first = timed(fn)
        warm = timed(fn, 5)
        out["shapes"].append({"rows": rows, "tokens": tokens, "first_ms": round(first, 2), "warm_ms": round(warm, 2),
                              "warm_tok_s": round(rows * tokens / warm * 1000)})
        bucket = graphs and graphs.bucket(rows, tokens)
        if bucket:
            ids = torch.randint(3, vocab, (rows, tokens)).tolist()
            slots = [[ex._scratch] * tokens] * rows  # timing only: every position into the scratch slot
            graph_ms = timed(lambda: graphs.run(bucket, ids, slots), 5)
            out["shapes"][-1].update({"graph_bucket": list(bucket), "graph_warm_ms": round(graph_ms, 2),
                                      "graph_gpu_ms": round(graphs.replay_ms(bucket), 3),
                                      "graph_speedup": round(warm / graph_ms, 2)})
        print(out["shapes"][-1], flush=True)
    fn = call(min(8, ex.limits.max_batch), min(128, ex.limits.max_prefill_tokens))
    timed(fn, 2)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as prof:
        for _ in range(5):
            fn()
        sync()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 5
    out["profile_8x128"] = {"gpu_ms_per_call": round(gpu_us / 1000, 3),
                            "kernels_per_call": sum(e.count for e in events if e.self_device_time_total > 0) / 5,
                            "table": events.table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                                  max_name_column_width=80).splitlines()}
    del engine  # held until here: the graphs write its pool
    text = json.dumps(out, indent=1)
    print("\n".join(out["profile_8x128"]["table"]))
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
