"""GPU time of one decode step per (program, bucket) of a cuda bundle: graph replays queued
back to back, no host work in between. Run it twice with different settings (e.g.
TORCH_BLAS_PREFER_CUBLASLT=1) to compare what a setting does to the kernels alone.

    python benchmarks/cuda_replay.py BUNDLE [--replays 300] [--buckets 1,8,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--replays", type=int, default=300)
    parser.add_argument("--buckets", default="1,8,16,64")
    args = parser.parse_args()
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    os.environ["ARLE_CUDA_GRAPHS"] = "1"  # capture every bucket at load
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.session import Session
    from cuda_h200 import graph_replay_ms

    session = Session.open(args.bundle, verify=False)
    executor = session.executor
    Engine(executor, session.tokenizer, (), EngineConfig(max_batch=64))  # binds the pool: captures the graphs
    out = graph_replay_ms(executor, args.replays, {int(b) for b in args.buckets.split(",")})
    out["blas"] = "cublaslt" if os.environ.get("TORCH_BLAS_PREFER_CUBLASLT") == "1" else "default"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
