"""The fused decode kernels on this GPU: each op's time at small batch beside cuBLAS and
the weight-read floor, and a sweep of block shapes (what the build's rule should pick).

    python benchmarks/fused_decode_kernels.py --out fused-kernels.json [--quick]

Shapes of one Qwen3-0.6B layer (hidden 1024, 16 query / 8 KV heads of 128, intermediate
3072): norm + qkv [4096 x 1024], o + residual [1024 x 2048], norm + gate/up + SiLU
[2 x 3072 x 1024], down + residual [1024 x 3072]; at batch 1, 8 and 16. Beside each:
cuBLAS `F.linear` alone (the unfused program's matmul without its norm / activation /
residual kernels) and the floor of reading the weight once at the copy bandwidth
measured here. The attention kernel (q/k norm, RoPE, paged walk) at past lengths 128,
512 and 2048. Every time is a CUDA-graph replay of many calls cycling over copies of the
weights that together exceed L2, median of 10 replays, per call (docs: METHOD.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 1024, 3072, 16, 8, 128
LINEAR_CONFIGS = [  # BLOCK_N, BLOCK_K, num_warps, num_stages
    (16, 128, 4, 4), (16, 256, 4, 4), (16, 256, 4, 3), (16, 512, 4, 3), (16, 256, 8, 4), (16, 512, 8, 3),
    (32, 128, 4, 4), (32, 256, 4, 3), (32, 256, 8, 3), (32, 128, 4, 5), (64, 64, 4, 4), (64, 128, 8, 3),
]
# block_n, warps, stages
ATTENTION_VARIANTS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2)]


def graph_us(calls, repeats: int = 8) -> float:
    """Median microseconds per call of `calls` (a list of closures) replayed in one graph."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (repeats * len(calls)))
    return round(statistics.median(times), 2)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)], repeats=4)
    return 2 * a.numel() / (us * 1e-6)


def load_module(**spec_kw):
    from arle_targets.kernels import FusedDecodeSpec, load_kernel_module, render_fused_decode

    spec = FusedDecodeSpec(head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, page_size=16,
                           kv_dtype="bfloat16", qk_norm=True,
                           num_sms=torch.cuda.get_device_properties(0).multi_processor_count, **spec_kw)
    path = pathlib.Path(tempfile.mkdtemp()) / "fused.py"
    path.write_text(render_fused_decode(spec))
    return load_kernel_module(path)


def linear_numbers(mod, bandwidth: float, batches, configs) -> dict:
    dt, dev = torch.bfloat16, "cuda"
    ops = {  # name: (weight rows, K, norm, gated, residual)
        "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, True, False, False),
        "o": (HIDDEN, HEADS * HEAD_DIM, False, False, True),
        "gate_up": (2 * INTER, HIDDEN, True, True, False),
        "down": (HIDDEN, INTER, False, False, True),
    }
    out = {}
    for name, (rows, k, norm, gated, residual) in ops.items():
        weight_bytes = rows * k * 2
        copies = max(2, -(-256 * 2**20 // weight_bytes))
        weights = [torch.randn(rows, k, device=dev, dtype=dt) * k**-0.5 for _ in range(copies)]
        norm_w = torch.rand(k, device=dev, dtype=dt) + 0.5
        n_out = rows // 2 if gated else rows
        entry = {"weight_mb": round(weight_bytes / 2**20, 2),
                 "floor_us": round(weight_bytes / bandwidth * 1e6, 2)}  # read once at the copy rate
        for B in batches:
            x = torch.randn(B, k, device=dev, dtype=dt)
            res = torch.randn(B, n_out, device=dev, dtype=dt) if residual else None

            def fused(config=None):
                return [lambda w=w: mod.launch_linear(x, norm_w if norm else None, w, None, None, res, 1e-6, gated,
                                                      traced=False, config=config) for w in weights]

            row = {"cublas_us": graph_us([lambda w=w: F.linear(x, w) for w in weights]),
                   "rule_us": graph_us(fused()), "rule_config": list(mod.linear_config(n_out, k, gated))}
            sweep = {}
            for config in configs:
                try:
                    sweep[str(config)] = graph_us(fused(config))
                except Exception as e:  # noqa: BLE001 - too much shared memory etc.: record and go on
                    sweep[str(config)] = f"{type(e).__name__}"
            timed = {c: t for c, t in sweep.items() if isinstance(t, float)}
            if timed:
                row["best_config"] = min(timed, key=timed.get)
                row["best_us"] = timed[row["best_config"]]
            row["sweep_us"] = sweep
            entry[f"b{B}"] = row
        out[name] = entry
    return out


def attention_numbers(batches, contexts, variants) -> dict:
    dt, dev = torch.bfloat16, "cuda"
    out = {}
    for block_n, warps, stages in variants:
        mod = load_module(block_n=block_n, num_warps=warps, num_stages=stages)
        key = f"block_n={block_n},warps={warps},stages={stages}"
        out[key] = {}
        for B in batches:
            for ctx in contexts:
                pages = -(-ctx // 16) + 1
                slots = B * pages * 16 + 2
                copies = max(2, -(-256 * 2**20 // (2 * slots * KV_HEADS * HEAD_DIM * 2 * 28)))
                pools = [(torch.randn(slots, KV_HEADS, HEAD_DIM, device=dev, dtype=dt),
                          torch.randn(slots, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)) for _ in range(min(copies, 8))]
                table = torch.randperm(B * pages, device=dev).view(B, pages).to(torch.int32)
                past = torch.full((B,), ctx, dtype=torch.int32, device=dev)
                qkv = torch.randn(B, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dt)
                cos, sin = torch.rand(B, HEAD_DIM, device=dev, dtype=dt), torch.rand(B, HEAD_DIM, device=dev, dtype=dt)
                qn, kn = torch.rand(HEAD_DIM, device=dev, dtype=dt), torch.rand(HEAD_DIM, device=dev, dtype=dt)
                calls = [lambda kp=kp, vp=vp: mod.launch_attention(qkv, cos, sin, qn, kn, kp, vp, table, past, 1e-6,
                                                                   traced=False) for kp, vp in pools]
                out[key][f"b{B}_ctx{ctx}"] = graph_us(calls)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="the rule's config only, no sweep")
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    mod = load_module()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_tb_s": round(bandwidth / 1e12, 2),
              "command": "python benchmarks/fused_decode_kernels.py " + " ".join(sys.argv[1:])}
    result["linear"] = linear_numbers(mod, bandwidth, (1, 8, 16), [] if args.quick else LINEAR_CONFIGS)
    result["attention_us"] = attention_numbers((1, 8), (128, 512, 2048),
                                               ATTENTION_VARIANTS[4:5] if args.quick else ATTENTION_VARIANTS)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"copy bandwidth {result['copy_bandwidth_tb_s']} TB/s")
    for name, entry in result["linear"].items():
        for B in (1, 8, 16):
            row = entry[f"b{B}"]
            print(f"{name:8s} b{B:<3d} floor {entry['floor_us']:6.2f}  cublas {row['cublas_us']:6.2f}  rule {row['rule_us']:6.2f} "
                  f"{row['rule_config']}  best {row.get('best_us', '-')} {row.get('best_config', '')}")
    for key, times in result["attention_us"].items():
        print(f"attention {key}: " + "  ".join(f"{k} {v}" for k, v in times.items()))


if __name__ == "__main__":
    main()
