"""Where an engine step's time goes, on a real bundle: each part of `Engine.step` timed.

    python benchmarks/engine_steps.py BUNDLE --concurrency 64 --out steps.json [--profile 40]

Runs `--concurrency` prompts of 128 tokens to 128 new tokens each (greedy, all admitted
at once, as `benchmarks/cuda_h200.py`'s in-process engine run does) and times, per step:
scheduling, the forward pass (`ModelRunner.run`, with a device sync after it so the GPU
time lands there and not in sampling), sampling, and postprocess + detokenizing. Steps
are split into decode-only steps and steps that also prefill. `--profile N` adds the N
functions with the most own time under cProfile (a second run, since cProfile slows the
host side down).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

PROMPT_TOKENS, NEW_TOKENS = 128, 128


def prompt_ids(seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (PROMPT_TOKENS,), generator=g).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wraps the engine's step parts with timers; `records` holds one dict per step."""

    def __init__(self, engine):
        self.engine, self.records, self._current = engine, [], None
        device = engine.executor.device
        sched, runner = engine.scheduler, engine.runner

        def timed(name, fn, after=None):
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                out = fn(*args, **kwargs)
                if after:
                    after(device)
                self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - started
                return out
            return wrapper

        def schedule():
            plan = inner_schedule()
            self._current["decodes"] = len(plan.decodes)
            self._current["prefill_tokens"] = sum(c.length for c in plan.prefills)
            self._current["prefill_chunks"] = len(plan.prefills)
            return plan

        inner_schedule = sched.schedule
        sched.schedule = timed("schedule", schedule)
        runner.run = timed("forward", runner.run, after=sync)
        engine._sample = timed("sample", engine._sample)
        sched.postprocess = timed("postprocess", sched.postprocess)
        engine._emit = timed("emit", engine._emit)  # detokenize, stop checks (inside postprocess's loop)
        self._inner_step = engine.step

    def step(self):
        self._current = {}
        started = time.perf_counter()
        out = self._inner_step()
        self._current["step"] = time.perf_counter() - started
        self.records.append(self._current)
        return out


def summarize(records: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in records:
        if "decodes" not in r:
            continue
        groups["prefill_and_decode" if r["prefill_tokens"] else "decode_only"].append(r)
    out = {}
    for name, rs in groups.items():
        parts = ("step", "schedule", "forward", "sample", "postprocess", "emit")
        out[name] = {"steps": len(rs), "mean_batch": round(sum(r["decodes"] for r in rs) / len(rs), 1),
                     **{f"{p}_ms": round(1000 * sum(r.get(p, 0.0) for r in rs) / len(rs), 3) for p in parts}}
        if name == "prefill_and_decode":
            out[name]["mean_prefill_tokens"] = round(sum(r["prefill_tokens"] for r in rs) / len(rs), 1)
            out[name]["mean_prefill_chunks"] = round(sum(r["prefill_chunks"] for r in rs) / len(rs), 1)
    return out


def run_once(session, concurrency: int, vocab: int, profile_rows: int = 0, batched_tokens: int | None = None) -> dict:
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams

    engine = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=concurrency, prefix_cache=False,
                                                                          max_num_batched_tokens=batched_tokens))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate([prompt_ids(7, vocab)], params)  # warm-up
    timer = StepTimer(engine)
    engine.step = timer.step
    prompts = [prompt_ids(1000 + i, vocab) for i in range(concurrency)]
    profiler = cProfile.Profile() if profile_rows else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    results = engine.generate(prompts, params)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - started
    out = {"wall_s": round(wall, 3), "tok_s": round(sum(len(r.token_ids) for r in results) / wall, 1),
           "steps": len(timer.records), "by_kind": summarize(timer.records),
           "prefill_step_ms": [round(1000 * r["step"], 1) for r in timer.records if r.get("prefill_tokens")]}
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(profile_rows)
        out["cprofile_tottime"] = text.getvalue().splitlines()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--max-batched-tokens", type=int, help="the engine's token budget per step (default: its own)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    from arle_runtime.session import Session

    started = time.perf_counter()
    session = Session.open(args.bundle, verify=False)
    open_s = time.perf_counter() - started
    vocab = session.tokenizer.get_vocab_size()
    result = {"bundle": session.bundle.name, "device": str(session.executor.device),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "concurrency": args.concurrency, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
              "command": "python " + " ".join(sys.argv), "open_s": round(open_s, 2),
              "timed": run_once(session, args.concurrency, vocab, 0, args.max_batched_tokens)}
    result["prefill_warmup_s"] = round(getattr(session.executor, "prefill_warmup_s", 0.0), 2)  # at the engine's start
    if args.profile:
        result["profiled"] = run_once(session, args.concurrency, vocab, args.profile, args.max_batched_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
