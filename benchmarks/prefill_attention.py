"""Prefill attention on the GPU, the three ways a cuda build can run it (targets/cuda.py,
ARLEC_PREFILL_ATTENTION): SDPA with enable_gqa and the step's mask (`gqa`), SDPA over K/V
repeated per query head (`expanded`), both under the SDPA backends the build allows
(prefill_attention_backends), and the generated kernel of templates/prefill_attention.py.j2
(`kernel`) in each of a few tile configurations.

    python benchmarks/prefill_attention.py [--out prefill-attention.json]

Qwen3-0.6B's attention shape (16 query / 8 KV heads of 128), bf16, the mask built as the
model builds it (models/layers.py, step_mask). Times one layer's attention per call (CUDA
events, 50 calls after 5 warm-up; the SDPA variants include the cache concatenation the
model does) and checks that all agree with `gqa`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from arle_models.layers import step_mask
from arle_targets.cuda import prefill_attention_backends
from arle_targets.kernels import PrefillAttentionSpec, load_kernel_module, render_prefill_attention

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
SHAPES = ((1, 128, 0), (8, 128, 0), (16, 128, 0), (64, 128, 0), (1, 512, 0), (1, 2048, 0), (8, 128, 128),
          (1, 512, 1536))  # rows, new tokens, past
CONFIGS = ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2), (32, 64, 4, 2))  # block_m, block_n, warps, stages


def timed(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    kernels = {}
    for block_m, block_n, warps, stages in CONFIGS:
        path = folder / f"prefill_{block_m}_{block_n}_{warps}_{stages}.py"
        path.write_text(render_prefill_attention(PrefillAttentionSpec(
            HEAD_DIM, HEADS, KV_HEADS, "bfloat16", block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)))
        kernels[path.stem.removeprefix("prefill_")] = load_kernel_module(path).prefill_attention
    rows = []
    for batch, tokens, past in SHAPES:
        q = torch.randn(batch, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        new_k, new_v = (torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")
        past_k, past_v = (torch.randn(batch, KV_HEADS, past, HEAD_DIM, dtype=torch.bfloat16, device="cuda") for _ in "kv")
        past_lens = torch.full((batch,), past, device="cuda")
        mask = step_mask(past_lens, past, tokens)
        groups = HEADS // KV_HEADS

        def gqa():
            keys, values = torch.cat((past_k, new_k), 2), torch.cat((past_v, new_v), 2)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

        def expanded():
            keys, values = torch.cat((past_k, new_k), 2), torch.cat((past_v, new_v), 2)
            return F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 1),
                                                  values.repeat_interleave(groups, 1), attn_mask=mask)

        with torch.no_grad(), prefill_attention_backends():
            reference = gqa().float()
            row = {"rows": batch, "tokens": tokens, "past": past, "gqa_ms": round(timed(gqa), 4),
                   "expanded_ms": round(timed(expanded), 4),
                   "expanded_max_abs_difference": (expanded().float() - reference).abs().max().item()}
            for name, kernel in kernels.items():
                call = lambda kernel=kernel: kernel(q, new_k, new_v, past_k, past_v, past_lens)  # noqa: E731
                row[f"kernel_{name}_ms"] = round(timed(call), 4)
                row[f"kernel_{name}_max_abs_difference"] = (call().float().transpose(1, 2) - reference).abs().max().item()
        best = min((k for k in row if k.startswith("kernel_") and k.endswith("_ms")), key=row.get)
        row["best_kernel"] = best
        row["speedup_expanded"] = round(row["gqa_ms"] / row["expanded_ms"], 2)
        row["speedup_best_kernel"] = round(row["gqa_ms"] / row[best], 2)
        print(row, flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "command": "python " + " ".join(sys.argv), "per_layer": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
