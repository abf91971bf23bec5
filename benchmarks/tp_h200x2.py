"""Tensor parallelism on two H200s: the same 8B-shaped model at TP=1 and TP=2.

    python benchmarks/tp_h200x2.py --work /tmp/tp --phase checkpoint   # random Llama-3-8B-shaped weights
    python benchmarks/tp_h200x2.py --work /tmp/tp --phase build-tp1    # arlec build --target cuda
    python benchmarks/tp_h200x2.py --work /tmp/tp --phase build-tp2    # ... --tp 2
    python benchmarks/tp_h200x2.py --work /tmp/tp --phase measure-tp1  # greedy tokens, bs1 decode, c64 serve
    python benchmarks/tp_h200x2.py --work /tmp/tp --phase measure-tp2
    python benchmarks/tp_h200x2.py --work /tmp/tp --phase report --out docs/perf/tp-h200x2.json

(--phase all runs them in order.) Each phase fits the device tool's 10-minute limit per
command and records what it measured in WORK/results.json, so a later phase (or a rerun
of a failed one) picks up from there. Measured per bundle, in fresh processes:

- greedy tokens: `arle-runtime run --raw --json` on 4 fixed prompts of 128 random word
  tokens, 64 new tokens each; TP=2 must give TP=1's tokens (same weights, bf16);
- decode_bs1_tok_s: that run's decode tok/s (engine, CUDA graphs), best of the prompts;
- throughput_c64_tok_s: output tok/s through `arle-runtime serve` on loopback with 64
  closed-loop clients (benchmarks/serve_load.py's client, via cuda_h200.server_numbers;
  the server needs starlette and uvicorn on the GPU image).

Every process started here keeps NVLink multicast off (NCCL_NVLS_ENABLE=0 and friends).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPE = "llama3-8b"
MAX_BATCH, MAX_CONTEXT = 64, 1024
PROMPT_TOKENS, NEW_TOKENS, PROMPTS = 128, 64, 4
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PHASES = ("checkpoint", "build-tp1", "build-tp2", "measure-tp1", "measure-tp2", "report")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env() -> dict:
    return {**os.environ, **NCCL_SAFE}


def load_results(work: Path) -> dict:
    path = work / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"commands": {}}


def save_results(work: Path, results: dict) -> None:
    tmp = work / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(work / "results.json")


def prompt_text(seed: int, vocab: int = 128256) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(PROMPT_TOKENS))


def run_logged(cmd: list[str], results: dict, key: str, timeout: float) -> subprocess.CompletedProcess:
    results["commands"][key] = " ".join(cmd)
    log("$ " + " ".join(cmd))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    log(f"  exit {proc.returncode} in {time.perf_counter() - started:.1f} s")
    if proc.returncode:
        raise SystemExit(f"{key} failed:\n{proc.stderr[-4000:]}")
    return proc


def phase_checkpoint(work: Path, results: dict) -> None:
    from random_checkpoint import write_checkpoint

    ckpt = work / "ckpt"
    if (ckpt / "config.json").exists():
        log(f"checkpoint already at {ckpt}")
        return
    log(f"writing a random {SHAPE} checkpoint to {ckpt} (16 GB)")
    started = time.perf_counter()
    write_checkpoint(SHAPE, ckpt)
    results["checkpoint_s"] = round(time.perf_counter() - started, 1)
    results["commands"]["checkpoint"] = f"python benchmarks/random_checkpoint.py --shape {SHAPE} --out {ckpt}"


def phase_build(work: Path, results: dict, tp: int) -> None:
    bundle = work / f"tp{tp}.arle"
    exe = Path(sys.executable).with_name("arlec")
    cmd = [str(exe), "build", "--model", str(work / "ckpt"), "--target", "cuda", "--quant", "bf16",
           "--max-batch", str(MAX_BATCH), "--max-context", str(MAX_CONTEXT), "--tp", str(tp),
           "--out", str(bundle), "--force"]
    started = time.perf_counter()
    run_logged(cmd, results, f"build_tp{tp}", timeout=590)
    results[f"tp{tp}_build_s"] = round(time.perf_counter() - started, 1)


def phase_measure(work: Path, results: dict, tp: int) -> None:
    from cuda_h200 import server_numbers

    bundle = work / f"tp{tp}.arle"
    exe = Path(sys.executable).with_name("arle-runtime")
    runs = []
    for i in range(PROMPTS):
        cmd = [str(exe), "run", str(bundle), "--raw", "--json", "--no-verify", "--max-tokens", str(NEW_TOKENS),
               "--prompt", prompt_text(i)]
        proc = run_logged(cmd, results, f"run_tp{tp}", timeout=240)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(f"  prompt {i}: {runs[-1]['completion_tokens']} tokens, {runs[-1]['decode_tok_s']} tok/s decode")
    results["commands"][f"run_tp{tp}"] = results["commands"][f"run_tp{tp}"].rsplit(" --prompt ", 1)[0] + \
        f" --prompt '<{PROMPT_TOKENS} random words>'"
    results[f"tp{tp}_greedy_ids"] = [r["token_ids"] for r in runs]
    results[f"tp{tp}_decode_bs1_tok_s"] = max(r["decode_tok_s"] for r in runs)
    log("serving at 1 and 64 clients")
    os.environ.update(NCCL_SAFE)  # server_numbers starts the server with this process's environment
    served = server_numbers(bundle, levels=(1, 64), max_tokens=128)
    results["commands"][f"serve_tp{tp}"] = (f"arle-runtime serve {bundle} --max-batch 64 --no-verify; "
                                           "64 closed-loop clients, 128 new tokens (benchmarks/serve_load.py)")
    results[f"tp{tp}_serve"] = served
    results[f"tp{tp}_throughput_c64_tok_s"] = served.get("throughput_c64_tok_s")
    log(f"  c64: {served.get('throughput_c64_tok_s')} tok/s, errors {served.get('errors_c64')}")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def phase_report(work: Path, results: dict, out: Path | None) -> dict:
    one, two = results.get("tp1_greedy_ids"), results.get("tp2_greedy_ids")
    if one is None or two is None:
        raise SystemExit("report needs measure-tp1 and measure-tp2 first")
    report = {
        "model": f"{SHAPE} shape, random bf16 weights (benchmarks/random_checkpoint.py)",
        "machine": "nvidia-h200-x2",
        "tp2_greedy_matches_tp1": one == two,
        "greedy_common_prefix_tokens": [common_prefix(a, b) for a, b in zip(one, two)],
        "greedy_tokens_per_prompt": NEW_TOKENS,
        "tp1_throughput_c64_tok_s": results.get("tp1_throughput_c64_tok_s"),
        "tp2_throughput_c64_tok_s": results.get("tp2_throughput_c64_tok_s"),
        "tp1_decode_bs1_tok_s": results.get("tp1_decode_bs1_tok_s"),
        "tp2_decode_bs1_tok_s": results.get("tp2_decode_bs1_tok_s"),
        "tp1_build_s": results.get("tp1_build_s"),
        "tp2_build_s": results.get("tp2_build_s"),
        "serve": {"tp1": results.get("tp1_serve"), "tp2": results.get("tp2_serve")},
        "settings": {"max_batch": MAX_BATCH, "max_context": MAX_CONTEXT, "prompt_tokens": PROMPT_TOKENS,
                     "greedy_new_tokens": NEW_TOKENS, "serve_new_tokens": 128, "quant": "bf16"},
        "commands": results["commands"],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    import torch

    report["torch"] = torch.__version__
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    text = json.dumps(report, indent=2) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log(f"wrote {out}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="checkpoint, bundles and results.json go here")
    ap.add_argument("--phase", choices=(*PHASES, "all"), default="all")
    ap.add_argument("--out", type=Path, default=None, help="report: write the JSON here (docs/perf/tp-h200x2.json)")
    args = ap.parse_args()
    os.environ.update(NCCL_SAFE)
    args.work.mkdir(parents=True, exist_ok=True)
    for phase in PHASES if args.phase == "all" else (args.phase,):
        log(f"phase {phase}")
        results = load_results(args.work)
        if phase == "checkpoint":
            phase_checkpoint(args.work, results)
        elif phase.startswith("build-tp"):
            phase_build(args.work, results, int(phase[-1]))
        elif phase.startswith("measure-tp"):
            phase_measure(args.work, results, int(phase[-1]))
        else:
            phase_report(args.work, results, args.out)
        save_results(args.work, results)


if __name__ == "__main__":
    main()
