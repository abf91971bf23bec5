"""Where a cold start of a cuda bundle goes: times each load stage in this (new) process.

    python benchmarks/cuda_load_profile.py BUNDLE
"""

from __future__ import annotations

import sys
import time

from arle_runtime.preload import reexec_with_system_libstdcxx

reexec_with_system_libstdcxx()
t0 = time.perf_counter()
marks = []


def mark(name: str) -> None:
    marks.append((name, time.perf_counter()))
    print(f"{name:32s} {marks[-1][1] - t0:7.2f} s", flush=True)


import torch  # noqa: E402

mark("import torch")
torch.zeros(1, device="cuda")
mark("cuda init")
from arle_runtime.bundle import load_bundle  # noqa: E402
from arle_runtime.executor import load_aoti_package  # noqa: E402

bundle = load_bundle(sys.argv[1], verify=False)
weights = bundle.weights
mark("manifest + mmap weights")
gpu = {n: t.to("cuda") for n, t in weights.items()}
torch.cuda.synchronize()
mark("weights to GPU")
for name in ("prefill", "decode_paged"):
    package = load_aoti_package(str(bundle.root / bundle.manifest["programs"][name]["path"]), 0, True)
    mark(f"aoti_load_package {name}")
del gpu
from arle_runtime.session import Session  # noqa: E402

session = Session.open(sys.argv[1], verify=False)
mark("Session.open (executor)")
engine = session.engine
mark("engine (KV pool + CUDA graphs)")
from arle_runtime.sampler import SamplingParams  # noqa: E402

engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=1))
mark("first token")
