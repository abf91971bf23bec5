"""Prefill attention on the GPU: SDPA with enable_gqa and the step's mask (the prefill
program's default) against K/V repeated per query head (`ARLEC_PREFILL_ATTENTION=expanded`),
under the SDPA backends the cuda build allows (targets/cuda.py, prefill_attention_backends).

    python benchmarks/prefill_attention.py [--out prefill-attention.json]

Qwen3-0.6B's attention shape (16 query / 8 KV heads of 128), bf16, the mask built as the
model builds it (models/layers.py, step_mask). Times one layer's attention per call (CUDA
events, 50 calls after 5 warm-up) and checks the two agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from arle_models.layers import step_mask
from arle_targets.cuda import prefill_attention_backends

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
SHAPES = ((1, 128, 0), (8, 128, 0), (16, 128, 0), (1, 512, 0), (8, 128, 128))  # rows, new tokens, past


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
    rows = []
    for batch, tokens, past in SHAPES:
        q = torch.randn(batch, HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        keys = torch.randn(batch, KV_HEADS, past + tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        values = torch.randn_like(keys)
        mask = step_mask(torch.full((batch,), past, device="cuda"), past, tokens)
        groups = HEADS // KV_HEADS

        def gqa():
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

        def expanded():
            return F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 1),
                                                  values.repeat_interleave(groups, 1), attn_mask=mask)

        with torch.no_grad(), prefill_attention_backends():
            error = (gqa().float() - expanded().float()).abs().max().item()
            row = {"rows": batch, "tokens": tokens, "past": past, "gqa_ms": round(timed(gqa), 4),
                   "expanded_ms": round(timed(expanded), 4), "max_abs_difference": error}
        row["speedup"] = round(row["gqa_ms"] / row["expanded_ms"], 2)
        print(row, flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "command": "python " + " ".join(sys.argv), "per_layer": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
