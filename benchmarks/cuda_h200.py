"""CUDA benchmark: arle's cuda bundle against transformers on the same weights, one run.

    python benchmarks/cuda_h200.py --work /tmp/bench --out docs/perf/cuda-h200.json

Qwen3-0.6B shape with random bf16 weights (benchmarks/random_checkpoint.py), 128 prompt /
128 output tokens, greedy. Measures: build time, cold start (new process -> first token),
batch-1 decode through the engine (CUDA graphs), transformers eager and compiled (static
cache + torch.compile) on the same weights, greedy agreement with transformers, and
engine throughput at 16 and 64 concurrent requests (in-process; --server adds the same
through `arle-runtime serve` over loopback, which needs starlette and uvicorn: on the GPU
image, carry their wheels as the device tool's README says).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT_TOKENS, NEW_TOKENS = 128, 128
# --server-ab: the server's environment with one change of 2026-12-08 taken out
SERVER_AB = {
    "no_prefill_graphs": {"ARLE_PREFILL_GRAPHS": "0"},  # every prefill calls the program directly
    "decode_lookahead": {"ARLE_LOOKAHEAD": "decodes"},  # arrivals drain the lookahead pipeline
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompt_ids(seed: int, n: int = PROMPT_TOKENS, vocab: int = 151936) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def build(ckpt: Path, bundle: Path, quant: str, max_batch: int, kv_dtype: str = "auto") -> dict:
    """build_s, and build_stages: seconds per stage from `arlec build`'s closing table."""
    started = time.perf_counter()
    proc = subprocess.run(
        ["arlec", "build", "--model", str(ckpt), "--target", "cuda", "--quant", quant, "--max-batch", str(max_batch),
         "--max-context", "1024", "--kv-dtype", kv_dtype, "--out", str(bundle), "--force"],
        capture_output=True, text=True,
    )
    if proc.returncode:
        raise SystemExit(f"build failed:\n{proc.stderr[-4000:]}")
    seconds = time.perf_counter() - started
    stages = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.rstrip().rpartition(" ")
        if name.strip() and name.strip() not in ("stage", "total") and value.replace(".", "", 1).isdigit():
            stages[name.strip()] = float(value)
    return {"build_s": round(seconds, 1), "build_stages": stages}


def cold_start(bundle: Path) -> float:
    """New process -> first generated text on stdout (the bundle's files are in the page cache)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["arle-runtime", "run", str(bundle), "--raw", "--prompt", "w5 w6 w7", "--max-tokens", "4", "--no-verify"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - started
    proc.communicate(timeout=120)
    if not first or proc.returncode:
        raise SystemExit(f"cold start run failed: {proc.returncode}")
    return elapsed


def engine_numbers(bundle: Path) -> dict:
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams
    from arle_runtime.session import Session

    session = Session.open(bundle, verify=False)
    engine = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=64))
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate([prompt_ids(99)], greedy)  # warm-up
    runs = [engine.generate([prompt_ids(0)], greedy)[0] for _ in range(3)]
    best = max(runs, key=lambda r: r.decode_tok_s)
    out = {
        "decode_bs1_tok_s_runs": [round(r.decode_tok_s, 1) for r in runs],
        "lookahead": engine._greedy is not None,
        "cuda_graphs": session.executor.use_graphs,
        "decode_bs1_tok_s": round(best.decode_tok_s, 1),
        "ttft_bs1_ms": round(best.ttft_s * 1000, 2),
        "greedy_ids": runs[0].token_ids,
        "graph_capture_s": round(session.executor.graph_capture_s, 2),
        "prompt_logits": prompt_logits(session.executor, prompt_ids(0)),
        "graph_replay_ms_by_bucket": {f"{p}/{b}": round(t, 4) for (p, b), t in sorted(session.executor.replay_ms.items())},
        "route_for_batch_1": "/".join(map(str, session.executor.route.get(1, ()))),
        "decode_programs": sorted(session.executor.decode_programs),
    }
    if session.executor.use_graphs:
        out.update(graph_replay_ms(session.executor))
    out["prefill_graphs"] = len(session.executor.prefill_graphs._graphs) if session.executor.prefill_graphs else 0
    out["prefill_graphs_off"] = session.executor.prefill_graphs_off
    out["prefill_capture_s"] = round(session.executor.prefill_warmup_s, 2)  # or the warm-up without graphs
    for c in (16, 64):
        out.update(concurrent(engine, c, greedy))
    out.update(gpu_busy(engine, 64, greedy))
    variants = {}  # batch 1 with each speed-up taken away, same process and weights
    if "decode_fused" in session.executor.decode_programs:
        session.executor.run_only("decode_paged")
        variants["decode_bs1_tok_s_paged_program"] = max(engine.generate([prompt_ids(0)], greedy)[0].decode_tok_s
                                                        for _ in range(3))
        session.executor.run_only(None)
    if engine._greedy is not None:
        sync = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=64, lookahead=False))
        sync.generate([prompt_ids(99)], greedy)
        variants["decode_bs1_tok_s_without_lookahead"] = max(sync.generate([prompt_ids(0)], greedy)[0].decode_tok_s
                                                            for _ in range(3))
        del sync
    if session.executor.prefill_graphs is not None:  # the same, with every prefill calling the program directly
        os.environ["ARLE_PREFILL_GRAPHS"] = "0"
        try:
            direct = Engine(session.executor, session.tokenizer, (), EngineConfig(max_batch=64))
        finally:
            os.environ.pop("ARLE_PREFILL_GRAPHS")
        direct.generate([prompt_ids(99)], greedy)
        variants["ttft_bs1_ms_without_prefill_graphs"] = min(
            direct.generate([prompt_ids(0)], greedy)[0].ttft_s for _ in range(3)) * 1000
        for c in (16, 64):
            variants.update({f"{k}_without_prefill_graphs": v for k, v in concurrent(direct, c, greedy).items()})
        del direct
    out.update({k: round(v, 1) for k, v in variants.items()})
    del engine, session
    torch.cuda.empty_cache()
    return out


def concurrent(engine, c: int, greedy) -> dict:
    """Output tok/s and TTFT p50 of `c` requests submitted together, through the engine in process."""
    prompts = [prompt_ids(1000 + i) for i in range(c)]
    engine.generate(prompts[:2], greedy)
    started = time.perf_counter()
    results = engine.generate(prompts, greedy)
    elapsed = time.perf_counter() - started
    return {f"engine_c{c}_tok_s": round(sum(len(r.token_ids) for r in results) / elapsed, 1),
            f"engine_c{c}_ttft_ms_p50": round(sorted(r.ttft_s for r in results)[c // 2] * 1000, 1)}


def busy_seconds(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def gpu_busy(engine, c: int, greedy, steps: int = 40) -> dict:
    """With `c` requests decoding (their prompts done): wall time per engine step, and the
    share of it the GPU spent running kernels (torch.profiler's kernel intervals, merged).
    Well below 1: the host holds the GPU up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for i in range(c):
        engine.add_request(prompt_ids(3000 + i), greedy)
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    # kernels only: tracing CPU ops would slow the host down (CPU activity on a machine without CUDA: a dry run)
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    while engine.has_work:
        engine.step()
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {f"engine_c{c}_step_ms": round(wall / steps * 1000, 3),
            f"engine_c{c}_gpu_busy_fraction": round(busy_seconds(kernels) / 1e6 / wall, 3) if kernels else None}


def prompt_logits(executor, ids: list[int]) -> torch.Tensor:
    """The bundle's next-token logits after the prompt (prefill program), for the logit error."""
    dev = executor.device
    empty = torch.zeros(executor.cache_shape(1, 0), dtype=executor.compute_dtype, device=dev)
    logits, _, _ = executor.prefill(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None],
                                    empty, empty, torch.zeros(1, dtype=torch.long, device=dev),
                                    torch.tensor([len(ids) - 1], device=dev))
    return logits[0].float().cpu()


def graph_replay_ms(executor, replays: int = 300, buckets=(1, 8, 16, 64)) -> dict:
    """GPU time of one decode step per bucket: graph replays queued back to back, so the
    host is never the bottleneck. Against the engine's per-token time this splits GPU
    work from host work (scheduling, input copy, sampling)."""
    return {f"graph_replay_ms_{p}_bs{b}": round(executor.replay_time_ms(b, replays, p), 4)
            for (p, b), (graph, _) in sorted(executor._graphs.items()) if b in buckets and graph is not None}


def server_numbers(bundle: Path, levels=(1, 16, 64), max_tokens: int = NEW_TOKENS, one_process: bool = False,
                   client_processes: int = 8, http_processes: int = 1, extra_env: dict | None = None) -> dict:
    """Output tok/s, TTFT and ITL through `arle-runtime serve` on loopback (benchmarks/serve_load.py's
    closed-loop clients, spread over `client_processes` processes: a single one spends ~170 us of CPU
    per token and can be the limit at c64); needs starlette and uvicorn (carry their wheels to the GPU machine).
    `one_process`: `serve --one-process` (the engine in the server's process), keys suffixed so;
    `http_processes` > 1: `serve --http-processes N`, keys suffixed `_httpN`; `extra_env`: the
    server's environment on top of this one's."""
    from serve_load import Server, SpreadClients, free_port, summarize

    port = free_port()
    exe = shutil.which("arle-runtime") or Path(sys.executable).with_name("arle-runtime")  # PATH first: benchmarks/gpu_env.sh
    server = Server("arle", [str(exe), "serve", str(bundle), "--port", str(port), "--max-batch", "64", "--no-verify",
                             *(["--one-process"] if one_process else []), "--http-processes", str(http_processes)],
                    port, {**os.environ, **(extra_env or {})}, Path("/tmp/arle-serve.log"))
    out = {}

    server.start()
    clients = SpreadClients(client_processes)
    try:
        server.wait_ready_blocking()
        out["server_ready_s"] = round(server.load_s, 2)
        for c in levels:
            prompts = [" ".join(f"w{t}" for t in prompt_ids(5000 + c * 10 + i)) for i in range(2 * c)]
            clients.level(server.base, server.model, prompts[:c], c, 8)  # warm-up burst
            records, wall, client_stats = clients.level(server.base, server.model, prompts, c, max_tokens)
            summary = summarize(records, wall, c)
            out[f"throughput_c{c}_tok_s"] = round(summary["output_tok_s"], 1)
            out[f"ttft_ms_p50_c{c}"] = summary["ttft_ms"]["p50"]
            out[f"accepted_ms_p50_c{c}"] = summary["accepted_ms"]["p50"]  # of TTFT, before the engine had it
            out[f"server_parse_ms_p50_c{c}"] = summary["server_parse_ms"]["p50"]  # of that, in the handler
            out[f"server_queue_ms_p50_c{c}"] = summary["server_queue_ms"]["p50"]
            out[f"itl_ms_p50_c{c}"] = summary["itl_ms"]["p50"]
            out[f"errors_c{c}"] = summary["errors"]
            out[f"client_cpu_busy_c{c}"] = client_stats["client_cpu_busy"]  # near 1.0: the clients were the limit
            out[f"client_processes_c{c}"] = client_stats["client_processes"]
            if summary["errors"]:
                out[f"error_samples_c{c}"] = summary["error_samples"]
    finally:
        clients.close()
        server.stop()
    if one_process:
        return {f"{k}_one_process": v for k, v in out.items()}
    if http_processes > 1:
        return {f"{k}_http{http_processes}": v for k, v in out.items()}
    if "ttft_ms_p50_c1" in out:  # the ttft/itl keys: one client, through the server
        out["ttft_ms_p50"], out["itl_ms_p50"] = out["ttft_ms_p50_c1"], out["itl_ms_p50_c1"]
    return out


def timed_generate(model, ids: torch.Tensor, **kw) -> tuple[list[int], float]:
    """transformers' greedy generate of NEW_TOKENS: (the new tokens, seconds)."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    torch.cuda.synchronize()
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - started


def hf_numbers(ckpt: Path, ours: list[int] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([prompt_ids(0)], device="cuda")
    with torch.no_grad():
        hf_logits = model(ids).logits[0, -1].float().cpu()

    timed_generate(model, ids)  # warm-up
    tokens, eager_s = timed_generate(model, ids)
    out = {"hf_greedy_ids": tokens, "hf_eager_bs1_tok_s": round(NEW_TOKENS / eager_s, 1), "hf_logits": hf_logits}
    if ours and ours != tokens:
        out["first_difference"] = first_difference(model, prompt_ids(0), ours, tokens)
    return out


def first_difference(model, prompt: list[int], ours: list[int], theirs: list[int]) -> dict:
    """Where arle's greedy tokens first leave transformers', and how close transformers' own
    logits of the two tokens were there (a near-tie that bf16 rounding may decide)."""
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    with torch.no_grad():
        row = model(torch.tensor([prompt + theirs[:i]], device="cuda")).logits[0, -1].float()
    return {"index": i, "transformers_token": theirs[i], "arle_token": ours[i],
            "transformers_logit_of_its_token": round(row[theirs[i]].item(), 4),
            "transformers_logit_of_arle_token": round(row[ours[i]].item(), 4),
            "logit_std": round(row.std().item(), 4)}


# transformers' compiled baselines, tried in this order, each in a process of its own:
# "auto" is generate()'s own compilation with a static cache (transformers compiles the
# decoding forward only: compiling the prefill too, with the cache's lazy set-up inside,
# is a known crash, huggingface/transformers#42467); then the whole forward compiled by
# hand with CUDA graphs ("reduce-overhead"), then without ("default").
HF_COMPILE_RECIPES = ("auto", "reduce-overhead", "default")


def hf_compile_numbers(ckpt: Path) -> dict:
    """The first of HF_COMPILE_RECIPES that runs, each in a child process: on torch 2.11 /
    transformers 5.17 the hand-compiled forward died with SIGSEGV, which would otherwise
    take this run's other figures (and the next recipes) with it."""
    errors = {}
    for recipe in HF_COMPILE_RECIPES:
        child = subprocess.run([sys.executable, __file__, "--hf-compile-child", str(ckpt), "--hf-compile-recipe",
                                recipe], capture_output=True, text=True)
        lines = child.stdout.strip().splitlines()
        if child.returncode == 0 and lines:
            result = json.loads(lines[-1])
            if "hf_compile_bs1_tok_s" in result:
                return {**result, **errors}
            errors.update(result)
            continue
        how = f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}"
        errors[f"hf_compile_error_{recipe}"] = f"the process {how}: {child.stderr.strip()[-300:]}"
    return errors


def hf_compile_child(ckpt: Path, recipe: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([prompt_ids(0)], device="cuda")
    kw = {"cache_implementation": "static"}
    if recipe != "auto":
        compiled = torch.compile(model.forward, mode=recipe, fullgraph=True)

        def forward(*a, **k):
            # generate can read a graph output after the next replay: mark each step
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*a, **k)

        model.forward = forward
        kw["disable_compile"] = True  # no second, automatic compilation around this one
    try:
        timed_generate(model, ids, **kw)
        timed_generate(model, ids, **kw)
        _, compiled_s = timed_generate(model, ids, **kw)
    except Exception as e:  # noqa: BLE001 - recorded; the parent tries the next recipe
        return {f"hf_compile_error_{recipe}": f"{type(e).__name__}: {e}"[:300]}
    return {"hf_compile_bs1_tok_s": round(NEW_TOKENS / compiled_s, 1), "hf_compile_mode": recipe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/cuda-bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--kv-dtype", default="auto")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: build,cold,engine,nographs,server,hf")
    parser.add_argument("--no-hf-compile", action="store_true")
    parser.add_argument("--server", action="store_true", help="also measure c16/c64 through arle-runtime serve")
    parser.add_argument("--server-one-process", action="store_true",
                        help="with --server: also c16/c64 through `serve --one-process`, for the ratio")
    parser.add_argument("--server-http-processes", type=int, default=4,
                        help="with --server: also c16/c64 through `serve --http-processes N` (N > 1; 1: not)")
    parser.add_argument("--server-ab", default="", help="with --server: also c1/c64 (--server-http-processes) "
                        f"with these changes taken out, for the ratio: comma-separated of {', '.join(SERVER_AB)}")
    parser.add_argument("--client-processes", type=int, default=8,
                        help="with --server: load-client processes (a single one can be the limit at c64)")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers of the same shape (quick runs)")
    parser.add_argument("--resume", action="store_true",
                        help="start from the --out file of an earlier run (split a run over two GPU calls)")
    parser.add_argument("--hf-compile-child", type=Path, help=argparse.SUPPRESS)  # hf_compile_numbers' child
    parser.add_argument("--hf-compile-recipe", choices=HF_COMPILE_RECIPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_compile_child:
        print(json.dumps(hf_compile_child(args.hf_compile_child, args.hf_compile_recipe)))
        return
    from arle_runtime.preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()  # before anything loads an AOTInductor package
    from random_checkpoint import write_checkpoint

    work = Path(args.work)
    ckpt = work / ("qwen3-0.6b-random" + (f"-{args.layers}l" if args.layers else ""))
    if not (ckpt / "config.json").exists():
        log("writing the random Qwen3-0.6B checkpoint")
        write_checkpoint("qwen3-0.6b", ckpt, layers=args.layers)
    kv = "" if args.kv_dtype == "auto" else f"-kv{args.kv_dtype}"
    bundle = work / f"{ckpt.name}-{args.quant}{kv}-cuda.arle"
    skip = set(filter(None, args.skip.split(",")))
    result = {"shape": "qwen3-0.6b (random weights)", "layers": args.layers or 28, "quant": args.quant,
              "kv_dtype": args.kv_dtype,
              "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "python benchmarks/cuda_h200.py " + " ".join(sys.argv[1:]), "errors": {}}

    logits_path = Path(f"{args.out}.logits.pt") if args.out else None  # the prompt logits, for a resumed run
    if args.resume and args.out and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        commands = [*earlier.pop("commands", [earlier["command"]]), result["command"]]
        result = {**earlier, "command": result["command"], "commands": commands}
        if logits_path.exists():
            result["prompt_logits"] = torch.load(logits_path)

    def save():
        if args.out:
            plain = {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
            Path(args.out).write_text(json.dumps(plain, indent=2) + "\n")
            if isinstance(result.get("prompt_logits"), torch.Tensor):
                torch.save(result["prompt_logits"], logits_path)

    def phase(name, fn):
        log(name)
        try:
            value = fn()
            result.update(value if isinstance(value, dict) else {name: value})
        except BaseException as e:  # keep what the other phases measured
            result["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{name} failed: {result['errors'][name]}")
        save()

    if not (bundle / "manifest.json").exists() and "build" not in skip:
        phase("build_s", lambda: build(ckpt, bundle, args.quant, 64, args.kv_dtype))
    if "cold" not in skip:
        phase("cold_start_s", lambda: round(min(cold_start(bundle) for _ in range(2)), 2))
    if "engine" not in skip:
        phase("engine", lambda: engine_numbers(bundle))
    if "decode_bs1_tok_s" in result and "nographs" not in skip:
        os.environ["ARLE_CUDA_GRAPHS"] = "0"
        phase("engine_without_graphs", lambda: {
            "decode_bs1_tok_s_without_graphs": engine_numbers(bundle)["decode_bs1_tok_s"]})
        os.environ.pop("ARLE_CUDA_GRAPHS")
    if "hf" not in skip:
        phase("transformers", lambda: hf_numbers(ckpt, result.get("greedy_ids")))
        if not args.no_hf_compile:
            phase("transformers_compile", lambda: hf_compile_numbers(ckpt))
    if args.server and "server" not in skip:
        if args.server_http_processes > 1:  # first: the c64 goal's figure, should a GPU call run out of time
            phase("server_http_processes", lambda: server_numbers(
                bundle, (16, 64), client_processes=args.client_processes, http_processes=args.server_http_processes))
        phase("server", lambda: server_numbers(bundle, client_processes=args.client_processes))
        for name in filter(None, args.server_ab.split(",")):  # the same server with a change taken out
            phase(f"server_{name}", lambda name=name: {
                f"{k}_{name}": v for k, v in server_numbers(
                    bundle, (1, 64), client_processes=args.client_processes,
                    http_processes=args.server_http_processes, extra_env=SERVER_AB[name]).items()})
        if args.server_one_process:
            phase("server_one_process", lambda: server_numbers(bundle, (16, 64), one_process=True,
                                                                 client_processes=args.client_processes))
    ours_logits, hf_logits = result.pop("prompt_logits", None), result.pop("hf_logits", None)
    if ours_logits is not None and hf_logits is not None:
        result["prompt_logits_rel_error_vs_transformers"] = round(
            ((ours_logits - hf_logits).norm() / hf_logits.norm()).item(), 5)
        result["prompt_top1_matches_transformers"] = int(ours_logits.argmax()) == int(hf_logits.argmax())
    ours, theirs = result.get("greedy_ids"), result.get("hf_greedy_ids")
    if ours and theirs:  # otherwise keep whichever ids there are, to compare across runs
        del result["greedy_ids"], result["hf_greedy_ids"]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        result["greedy_matches_transformers"] = ours == theirs
        result["greedy_tokens_equal_before_first_difference"] = same
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
