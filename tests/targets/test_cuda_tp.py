"""Tensor parallelism on GPUs: a `--tp 2` cuda bundle (NCCL, CUDA graphs with the
all-reduces inside) must generate the TP=1 bundle's greedy tokens. Needs 2 CUDA GPUs and
skips without them; the same logic is tested on the CPU over gloo in
tests/runtime/test_tensor_parallel.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, build_bundle, run_cli

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
sys.path.insert(0, str(REPO / "benchmarks"))
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _checkpoint(bundle_dir: Path) -> Path:
    from random_checkpoint import write_checkpoint

    ckpt = bundle_dir / "llama-tiny-ckpt"
    if not (ckpt / "config.json").is_file():
        write_checkpoint("llama-tiny", ckpt)
    return ckpt


@pytest.fixture(scope="module")
def cuda_bundles(bundle_dir) -> tuple[Path, Path]:
    args = ("--model", str(_checkpoint(bundle_dir)), "--target", "cuda", "--quant", "bf16", "--max-batch", "16",
            "--max-context", "512")
    return build_bundle(bundle_dir, "tiny-bf16-cuda", *args), build_bundle(bundle_dir, "tiny-bf16-cuda-tp2", *args,
                                                                           "--tp", "2")


def _run(bundle: Path, prompt: str) -> dict:
    proc = run_cli("arle-runtime", "run", str(bundle), "--raw", "--json", "--prompt", prompt, "--max-tokens", "24",
                   env=NCCL_SAFE, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_cuda_tp2_greedy_tokens_equal_tp1(cuda_bundles):
    tp1, tp2 = cuda_bundles
    manifest = json.loads((tp2 / "manifest.json").read_text())
    assert manifest["tensor_parallel"]["size"] == 2
    for prompt in ("w5 w6 w7 w8", "w100 w200 w300 w400 w500 w600"):
        assert _run(tp2, prompt)["token_ids"] == _run(tp1, prompt)["token_ids"], prompt


ENGINE_SCRIPT = """
import json, sys
from arle_runtime.sampler import SamplingParams
from arle_runtime.session import Session
s = Session.open(sys.argv[1], verify=False)
prompts = [s.encode(" ".join(f"w{i * 7 + j}" for j in range(5 + 9 * i))) for i in range(12)]
done = s.engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
print(json.dumps({"tokens": [c.token_ids for c in done], "graphs": bool(s.executor.use_graphs)}))
"""


def test_cuda_tp2_engine_batches_replay_graphs_with_the_all_reduces(cuda_bundles):
    outs = []
    for bundle in cuda_bundles:
        proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(bundle)], capture_output=True, text=True,
                              timeout=600, env={**os.environ, **NCCL_SAFE})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[1]["graphs"]
    assert outs[1]["tokens"] == outs[0]["tokens"]
