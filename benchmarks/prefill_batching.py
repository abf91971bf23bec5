"""Prompts admitted in one step: one prefill call per group against one call per prompt.

    python benchmarks/prefill_batching.py build/smollm2-135m-instruct-int8-cpu.arle --out docs/perf/prefill-batching-cpu.json

Runs `--prompts` prompts of `--prompt-tokens` tokens through the engine with one new
token each (so the wall time is prefill), twice in the same process and alternating:
with the runner's grouping (runtime/engine/model_runner.py `prefill_groups`) and with
every chunk in a call of its own (what the runner did before). Reports wall time,
TTFT p50 and the number of prefill program calls for each, best of `--repeats`.
On a GPU the saving is per call (weights read and kernels launched once per call); on
this CPU the prefill is compute-bound, so the gain here is the smaller, lower bound.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

import arle_runtime.engine.model_runner as model_runner  # noqa: E402
from arle_runtime.engine import Engine, EngineConfig  # noqa: E402
from arle_runtime.sampler import SamplingParams  # noqa: E402
from arle_runtime.session import Session  # noqa: E402

GROUPED = model_runner.prefill_groups


def one_per_call(chunks, limits, padding_limit=1.0, equal_lengths=False):
    return [[c] for c in chunks]


def run(session: Session, prompts: list[list[int]], grouping) -> dict:
    model_runner.prefill_groups = grouping
    calls = 0
    inner = session.executor.prefill

    def counted(*args):
        nonlocal calls
        calls += 1
        return inner(*args)

    session.executor.prefill = counted
    try:
        engine = Engine(session.executor, session.tokenizer, (), EngineConfig(prefix_cache=False))
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        started = time.perf_counter()
        results = engine.generate(prompts, params)
        wall = time.perf_counter() - started
    finally:
        session.executor.prefill = inner
        model_runner.prefill_groups = GROUPED
    ttft = sorted(r.ttft_s for r in results)[len(results) // 2]
    return {"wall_s": round(wall, 3), "ttft_ms_p50": round(ttft * 1000, 1), "prefill_calls": calls,
            "prompt_tok_s": round(sum(len(p) for p in prompts) / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    session = Session.open(args.bundle, verify=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(200, 49000) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    run(session, prompts[:2], GROUPED)  # warm-up
    runs = {"grouped": [], "one_per_call": []}
    for _ in range(args.repeats):
        runs["grouped"].append(run(session, prompts, GROUPED))
        runs["one_per_call"].append(run(session, prompts, one_per_call))
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    speedup = best["one_per_call"]["wall_s"] / best["grouped"]["wall_s"]
    for name, r in best.items():
        print(f"{name:>13}: {r['wall_s']:.3f} s, TTFT p50 {r['ttft_ms_p50']} ms, {r['prefill_calls']} prefill calls")
    print(f"grouped prefill: {speedup:.2f}x the one-call-per-prompt wall time")
    if args.out:
        result = {"machine": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "bundle": session.bundle.name, "max_batch": session.executor.limits.max_batch,
                  "max_prefill_tokens": session.executor.limits.max_prefill_tokens,
                  "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                  "command": "python " + " ".join(sys.argv), "best": best, "runs": runs,
                  "speedup": round(speedup, 2)}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
