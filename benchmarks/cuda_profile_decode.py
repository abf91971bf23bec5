"""Where a decode step's GPU time goes: torch.profiler over engine decode steps of a cuda
bundle with CUDA graphs off (so each kernel is recorded), kernels sorted by CUDA time.

    python benchmarks/cuda_profile_decode.py BUNDLE [--batch 1] [--steps 20] [--program decode_fused] [--out F]

`--program` runs every step on one decode program (without graphs the runtime would pick
decode_paged); the kernels per step say how many launches a graph replay holds.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["ARLE_CUDA_GRAPHS"] = "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--program", choices=("decode_paged", "decode_fused"), default="decode_paged")
    parser.add_argument("--out", help="also write the table and counts as json here")
    args = parser.parse_args()
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams
    from arle_runtime.session import Session

    session = Session.open(args.bundle, verify=False)
    session.executor.run_only(args.program)
    engine = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=max(args.batch, 1)))
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request([3 + (i * 31 + j) % 4000 for j in range(128)], params)
    for _ in range(10):  # prefill and warm up
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90)
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / args.steps
    gpu_ms = sum(e.self_device_time_total for e in events) / args.steps / 1000
    print(f"{args.program}, batch {args.batch}, {args.steps} decode steps; divide totals by {args.steps} for one step")
    print(f"{kernels:.0f} kernels and {gpu_ms:.3f} ms of GPU time per step")
    print(table)
    if args.out:
        import json

        with open(args.out, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "program": args.program, "batch": args.batch,
                       "kernels_per_step": kernels, "gpu_ms_per_step": round(gpu_ms, 4),
                       "table": table.splitlines()}, f, indent=1)


if __name__ == "__main__":
    main()
