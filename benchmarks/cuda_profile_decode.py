"""Where a decode step's GPU time goes: torch.profiler over engine decode steps of a cuda
bundle with CUDA graphs off (so each kernel is recorded), kernels sorted by CUDA time.

    python benchmarks/cuda_profile_decode.py BUNDLE [--batch 1] [--steps 20]
"""

from __future__ import annotations

import argparse
import os

os.environ["ARLE_CUDA_GRAPHS"] = "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams
    from arle_runtime.session import Session

    session = Session.open(args.bundle, verify=False)
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
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90)
    print(f"batch {args.batch}, {args.steps} decode steps; divide totals by {args.steps} for one step")
    print(table)


if __name__ == "__main__":
    main()
