"""Mixture-of-experts on the GPU: a Qwen3-30B-A3B-shaped cuda bundle against transformers
on the same random bf16 weights, in one run.

    python benchmarks/moe_h200.py --work /tmp/moe --out docs/perf/moe-h200.json [--layers 48]

Writes the random checkpoint (benchmarks/random_checkpoint.py, `qwen3-30b-a3b`; ~61 GB
for all 48 layers, so the work folder needs ~130 GB for checkpoint + bundle; `--layers`
keeps the shape and builds fewer layers), builds it (`--target cuda --quant bf16`, the
fused expert kernel in both programs), then measures greedy decode tok/s at batch 1 and
64 (128-token prompts, 128 new tokens) through the engine, and transformers' `generate`
on the same weights at batch 1 and 64, plus greedy agreement at batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT_TOKENS, NEW_TOKENS = 128, 128


def engine_tok_s(bundle: Path, batches) -> dict:
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams
    from arle_runtime.session import Session
    from cuda_h200 import prompt_ids

    session = Session.open(bundle, verify=False)
    engine = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=max(batches)))
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate([prompt_ids(99)], greedy)  # warm-up
    out = {"greedy_ids": engine.generate([prompt_ids(0)], greedy)[0].token_ids}
    for b in batches:
        prompts = [prompt_ids(1000 + i) for i in range(b)]
        started = time.perf_counter()
        results = engine.generate(prompts, greedy)
        elapsed = time.perf_counter() - started
        decode = [r.decode_tok_s for r in results]
        out[f"arle_bs{b}_tok_s"] = round(sum(len(r.token_ids) for r in results) / elapsed, 1)
        out[f"arle_bs{b}_decode_tok_s_per_sequence_p50"] = round(sorted(decode)[b // 2], 1)
    out["route_for_batch_1"] = "/".join(map(str, session.executor.route.get(1, ())))
    del engine, session
    torch.cuda.empty_cache()
    return out


def hf_tok_s(ckpt: Path, batches, ours: list[int]) -> dict:
    from transformers import AutoModelForCausalLM
    from cuda_h200 import first_difference, prompt_ids

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    out = {}
    for b in batches:
        ids = torch.tensor([prompt_ids(0 if b == 1 else 1000 + i) for i in range(b)], device="cuda")
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        torch.cuda.synchronize()
        out[f"hf_eager_bs{b}_tok_s"] = round(b * NEW_TOKENS / (time.perf_counter() - started), 1)
        if b == 1:
            out["hf_greedy_ids"] = gen[0, ids.shape[1]:].tolist()
            if ours != out["hf_greedy_ids"]:
                out["first_difference"] = first_difference(model, prompt_ids(0), ours, out["hf_greedy_ids"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/moe-bench")
    parser.add_argument("--out")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's 48)")
    parser.add_argument("--batches", default="1,64")
    args = parser.parse_args()
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    from cuda_h200 import build
    from random_checkpoint import write_checkpoint

    batches = tuple(int(b) for b in args.batches.split(","))
    work = Path(args.work)
    ckpt = work / f"qwen3-30b-a3b-{args.layers or 48}l"
    bundle = work / f"{ckpt.name}-bf16-cuda.arle"
    result = {"shape": "qwen3-30b-a3b (random weights)", "layers": args.layers or 48,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/moe_h200.py " + " ".join(sys.argv[1:])}
    if not (ckpt / "config.json").exists():
        started = time.perf_counter()
        write_checkpoint("qwen3-30b-a3b", ckpt, layers=args.layers)
        result["checkpoint_s"] = round(time.perf_counter() - started, 1)
    if not (bundle / "manifest.json").exists():
        result.update(build(ckpt, bundle, "bf16", max(2, *batches)))  # cuda needs --max-batch >= 2
    result.update(engine_tok_s(bundle, batches))
    result.update(hf_tok_s(ckpt, batches, result["greedy_ids"]))
    ours, theirs = result.pop("greedy_ids"), result.pop("hf_greedy_ids")
    result["greedy_matches_transformers"] = ours == theirs
    result["greedy_tokens_equal_before_first_difference"] = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    for b in batches:
        result[f"speedup_bs{b}"] = round(result[f"arle_bs{b}_tok_s"] / result[f"hf_eager_bs{b}_tok_s"], 2)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
