"""Prefill and decode tok/s of the default model's CPU bundles next to transformers and llama.cpp.

    python benchmarks/cpu_decode.py --bundle fp32=build/t-fp32.arle --bundle int8=build/t-int8.arle \\
        [--repeats 3] [--threads 2] [--only PATTERN] [--smoke] [--out FILE]

One row per engine and variant, each measured in a subprocess of its own (torch's and
llama.cpp's thread pools must not share a process), one after another, all with the
same thread count (--threads, default 2):

  arle          every bundle given with --bundle LABEL=PATH (the compiled prefill/decode programs)
  transformers  AutoModelForCausalLM.from_pretrained on the same GGUF, float32 and a bfloat16
                copy, run eagerly (no torch.compile): a manual loop with a DynamicCache
  llama.cpp     the shipped Q4_1 GGUF as is, plus F32, BF16, Q8_0 and Q4_0 files derived from it
                into --gguf-cache (made once, then reused): the F32 file holds every tensor of
                the shipped one dequantized, in GGUF's own layout and order, with every
                metadata field copied (general.file_type set to F32); the others are
                llama_model_quantize'd from it with llama.cpp's default parameters

Every engine gets the same prompt ids: the start of benchmarks/data/perplexity.txt,
tokenized by the model's own tokenizer (no special tokens), cut to --prompt-tokens (128).
A run is one prefill of the whole prompt (one forward; the first new token is the
argmax of its last logits), then --new-tokens (128) decode steps at batch 1, each
feeding the previous greedy token (no stop on EOS). The prefill and decode times of
each run are taken with time.perf_counter around that engine's own calls; the reported
tok/s is the median over --repeats runs after one warm-up run.

Ratios compare decode tok/s: against transformers fp32 eager, and against llama.cpp at
the same width (fp32-F32, bf16-BF16, int8-Q8_0, int4-Q4_0); above 1 means faster.
--smoke runs a tiny version (16-token prompt, 8 new tokens, 1 repeat), prints each
engine's continuation, and checks that every llama.cpp file answers "What is the
capital of France?" with Paris.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from machine import cpu_name

from arle_runtime.bundle import sha256_file

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
PROMPT_TEXT = HERE / "data" / "perplexity.txt"
# llama.cpp files derived from the shipped GGUF: tag -> llama_ftype name (None: written by us)
DERIVED_GGUF = {"F32": None, "BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
SHIPPED_TAG = "Q4_1"
# width of a row -> the llama.cpp file it is compared with
LLAMA_AT_WIDTH = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
CHECK_QUESTION = "What is the capital of France?"


# ---------------------------------------------------------------- small helpers


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_info(threads: int) -> dict:
    return {
        "cpu": cpu_name(),
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "llama_cpp_python": package_version("llama_cpp_python"),
        "gguf": package_version("gguf"),
        "arle": package_version("arle"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": load_average(),
    }


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ARLE_THREADS"):
        env[var] = str(threads)
    return env


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send file descriptor 2 (where llama.cpp's C code logs) to a file for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


# ---------------------------------------------------------------- prompt


def model_tokenizer(model_path: Path):
    """The tokenizer arlec rebuilds from the GGUF's metadata (the one its bundles ship)."""
    import gguf
    from tokenizers import Tokenizer

    from arlec.sources import gguf_tokenizer

    tokenizer_json, _ = gguf_tokenizer(gguf.GGUFReader(model_path), model_path)
    return Tokenizer.from_str(tokenizer_json)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n ids of the fixed text, without special tokens."""
    ids = tokenizer.encode(PROMPT_TEXT.read_text(), add_special_tokens=False).ids
    if len(ids) < n:
        raise SystemExit(f"{PROMPT_TEXT} has only {len(ids)} tokens; ask for fewer with --prompt-tokens.")
    return ids[:n]


# ---------------------------------------------------------------- llama.cpp files


def write_f32_gguf(src: Path, dst: Path) -> None:
    """Copy src with every tensor dequantized to F32 (GGUF layout and order kept, Q/K not un-permuted)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)  # writes general.architecture itself
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # header fields, not metadata
        value = field.contents()
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)  # the tensors are F32 now
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(src: Path, dst: Path, ftype_name: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = threads
    with stderr_to(dst.with_suffix(".log")):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype_name} failed (code {rc}); see {dst.with_suffix('.log')}")


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def derived_path(shipped: Path, cache: Path, tag: str) -> Path:
    stem = shipped.name.removesuffix(".gguf").removesuffix(f".{SHIPPED_TAG}")
    return cache / f"{stem}.{tag}.gguf"


def derived_gguf(shipped: Path, cache: Path, tag: str, threads: int) -> tuple[Path, bool]:
    """The path of the derived file `tag` and whether it was made now (with the F32 file it comes from)."""
    path = derived_path(shipped, cache, tag)
    if path.is_file():
        return path, False
    print(f"deriving {path} ...", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    if DERIVED_GGUF[tag] is None:
        write_f32_gguf(shipped, partial)
    else:
        f32, _ = derived_gguf(shipped, cache, "F32", threads)
        quantize_gguf(f32, partial, DERIVED_GGUF[tag], threads)
    partial.rename(path)  # only complete files are ever reused
    return path, True


def ask_capital(path: Path, threads: int) -> str:
    """Greedy chat answer of a GGUF to CHECK_QUESTION, by llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    try:
        out = llm.create_chat_completion(
            [{"role": "user", "content": CHECK_QUESTION}], max_tokens=24, temperature=0.0, top_k=1
        )
        return out["choices"][0]["message"]["content"].strip()
    finally:
        llm.close()


# ---------------------------------------------------------------- engines (run in workers)
# Each returns (prefill, step, info): prefill(ids) runs the prompt from an empty cache and
# returns the greedy next token; step(token) feeds one token and returns the next.


def arle_engine(job: dict):
    import torch

    from arle_runtime.bundle import load_bundle
    from arle_runtime.executor import load_executor
    from arle_runtime.generate import prefill as arle_prefill

    bundle = load_bundle(job["path"])
    ex = load_executor(bundle)
    torch.set_num_threads(job["threads"])
    state = {}

    @torch.inference_mode()
    def prefill(ids):
        logits, state["k"], state["v"] = arle_prefill(ex, ids)
        return int(logits.argmax())

    @torch.inference_mode()
    def step(token):
        pos = state["k"].shape[3]
        logits, nk, nv = ex.decode(
            torch.tensor([[token]]),
            torch.tensor([[pos]]),
            state["k"],
            state["v"],
            torch.tensor([pos]),
            torch.zeros(1, dtype=torch.long),
        )
        state["k"], state["v"] = torch.cat((state["k"], nk), 3), torch.cat((state["v"], nv), 3)
        return int(logits[0].argmax())

    info = {"bundle": str(job["path"]), "quantization": bundle.manifest.get("quantization", {}),
            "kv_dtype": str(ex.kv_dtype).removeprefix("torch.")}
    return prefill, step, info


def transformers_engine(job: dict):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(job["threads"])
    path = Path(job["path"])
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation=job["attn"]
    )
    if job["variant"] == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    state = {}

    @torch.inference_mode()
    def prefill(ids):
        state["cache"] = DynamicCache(config=model.config)
        out = model(torch.tensor([ids]), past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(token):
        out = model(torch.tensor([[token]]), past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    info = {"gguf": str(path), "dtype": job["variant"], "attn_implementation": model.config._attn_implementation}
    return prefill, step, info


def llama_engine(job: dict):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(512, job["prompt_tokens"] + job["new_tokens"] + 16)
    llm = Llama(
        job["path"],
        n_ctx=n_ctx,
        n_batch=max(512, job["prompt_tokens"]),  # the whole prompt in one batch
        n_ubatch=max(512, job["prompt_tokens"]),
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def greedy():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return greedy()

    def step(token):
        llm.eval([token])
        return greedy()

    info = {"gguf": job["path"], "n_ctx": n_ctx, "n_batch": llm.n_batch, "flash_attn_type": llm.context_params.flash_attn_type,
            "size_mib": Path(job["path"]).stat().st_size / 2**20, "tensor_types": tensor_types(Path(job["path"]))}
    return prefill, step, info


ENGINES = {"arle": arle_engine, "transformers": transformers_engine, "llama.cpp": llama_engine}


def measure(prefill, step, ids: list[int], new_tokens: int, repeats: int) -> dict:
    """One warm-up run, then `repeats` timed runs of prefill + new_tokens decode steps."""
    prefill_s, decode_s = [], []
    for run in range(repeats + 1):
        t0 = time.perf_counter()
        token = prefill(ids)
        t1 = time.perf_counter()
        tokens = [token]
        for _ in range(new_tokens):
            token = step(token)
            tokens.append(token)
        t2 = time.perf_counter()
        if run > 0:
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens}


def peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM; ru_maxrss would count the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def worker(job_file: Path) -> None:
    job = json.loads(job_file.read_text())
    t0 = time.perf_counter()
    prefill, step, info = ENGINES[job["engine"]](job)
    load_s = time.perf_counter() - t0
    result = measure(prefill, step, job["ids"], job["new_tokens"], job["repeats"])
    result.update(info=info, load_s=load_s, peak_rss_mib=peak_rss_mib())
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- orchestration


def plan(args, shipped: Path) -> list[dict]:
    """Every (engine, variant) row to run, before --only."""
    rows = []
    for label, path in args.bundle:
        rows.append({"engine": "arle", "variant": label, "path": str(path), "width": bundle_scheme(path)})
    for dtype in ("fp32", "bf16"):
        rows.append({"engine": "transformers", "variant": dtype, "path": str(shipped), "width": dtype})
    for tag in (*DERIVED_GGUF, SHIPPED_TAG):
        rows.append({"engine": "llama.cpp", "variant": tag, "path": None if tag != SHIPPED_TAG else str(shipped), "width": tag})
    for row in rows:
        row["name"] = f"{row['engine']}/{row['variant']}"
    return rows


def bundle_scheme(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / "manifest.json").read_text())["quantization"]["scheme"]
    except (OSError, KeyError, ValueError):
        return None


def selected(name: str, patterns: list[str]) -> bool:
    """A glob matches the whole name; a plain word anywhere in it."""
    if not patterns:
        return True
    return any(fnmatch.fnmatch(name, p) if any(c in p for c in "*?[") else p in name for p in patterns)


def run_worker(row: dict, common: dict, tmp: Path, threads: int) -> dict:
    job_file, result_file = tmp / "job.json", tmp / "result.json"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**row, **common, "result": str(result_file)}))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)],
        env=thread_env(threads),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"worker exited {proc.returncode}", "stderr_tail": tail}
    return json.loads(result_file.read_text())


def summarize(row: dict, result: dict, prompt_tokens: int, new_tokens: int) -> dict:
    out = {k: row[k] for k in ("name", "engine", "variant", "width")}
    out.update(result)
    if "error" not in result:
        out["prefill_tok_s"] = prompt_tokens / statistics.median(result["prefill_s"])
        out["decode_tok_s"] = new_tokens / statistics.median(result["decode_s"])
        out["ms_per_token"] = 1000.0 / out["decode_tok_s"]
    return out


def add_ratios(rows: list[dict]) -> None:
    by_name = {r["name"]: r for r in rows if "decode_tok_s" in r}
    ref = by_name.get("transformers/fp32")
    for r in rows:
        if "decode_tok_s" not in r:
            continue
        r["decode_vs_transformers_fp32"] = r["decode_tok_s"] / ref["decode_tok_s"] if ref else None
        tag = LLAMA_AT_WIDTH.get(r["width"]) if r["engine"] != "llama.cpp" else None
        llama = by_name.get(f"llama.cpp/{tag}") if tag else None
        r["llama_cpp_at_width"] = f"llama.cpp/{tag}" if llama else None
        r["decode_vs_llama_cpp_at_width"] = r["decode_tok_s"] / llama["decode_tok_s"] if llama else None


def markdown_table(rows: list[dict]) -> str:
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    lines = [
        "| engine/variant | prefill tok/s | decode tok/s | ms/token | decode vs transformers fp32 | decode vs llama.cpp same width |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | failed | - | - | - |")
            continue
        vs_llama = ratio(r.get("decode_vs_llama_cpp_at_width"))
        if r.get("llama_cpp_at_width"):
            vs_llama += f" ({r['llama_cpp_at_width'].split('/')[1]})"
        lines.append(
            f"| {r['name']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['ms_per_token']:.2f} | "
            f"{ratio(r.get('decode_vs_transformers_fp32'))} | {vs_llama} |"
        )
    return "\n".join(lines)


def parse_bundle(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--bundle takes LABEL=PATH (e.g. int8=build/t-int8.arle), got {text!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", action="append", type=parse_bundle, default=[], metavar="LABEL=PATH",
                    help="an arle CPU bundle of the default model to measure (repeatable)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up (median reported)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run only rows whose name (e.g. arle/int8, llama.cpp/Q8_0) matches; repeatable, or comma-separated")
    ap.add_argument("--gguf-cache", type=Path, default=Path("build/bench-gguf"), help="where derived GGUF files are kept")
    ap.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention implementation")
    ap.add_argument("--smoke", action="store_true", help="tiny run (16-token prompt, 8 new tokens, 1 repeat) plus checks")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(args.worker)
        return 0
    if args.smoke:
        args.prompt_tokens, args.new_tokens, args.repeats = 16, 8, 1
    patterns = [p.strip() for item in args.only for p in item.split(",") if p.strip()]

    from arlec.sources import default_model_path

    shipped = default_model_path()
    tokenizer = model_tokenizer(shipped)
    ids = prompt_ids(tokenizer, args.prompt_tokens)
    rows = [r for r in plan(args, shipped) if selected(r["name"], patterns)]
    if not rows:
        ap.error(f"--only {patterns} matches no row")
    info = machine_info(args.threads)
    print(f"{info['cpu']}, {args.threads} threads; torch {info['torch']}, transformers {info['transformers']}, "
          f"llama-cpp-python {info['llama_cpp_python']}", file=sys.stderr)
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.repeats} after a warm-up",
          file=sys.stderr)

    # llama.cpp files: derive what is missing; check each answers the capital question
    checks = {}
    for row in rows:
        if row["engine"] != "llama.cpp":
            continue
        if row["path"] is None:
            path, made = derived_gguf(shipped, args.gguf_cache, row["variant"], args.threads)
            row["path"] = str(path)
        else:
            made = False
        if args.smoke or made:
            answer = ask_capital(Path(row["path"]), args.threads)
            checks[row["name"]] = {"answer": answer, "paris": "paris" in answer.lower()}
            print(f"{row['name']}: {CHECK_QUESTION!r} -> {answer!r}", file=sys.stderr)
    bad = [name for name, c in checks.items() if not c["paris"]]
    if bad:
        # Not fatal: the question sits near a tie for this model, and llama.cpp's quantized types
        # (which also quantize activations to 8 bits) can tip it; compare with the shipped file.
        print(f"warning: {', '.join(bad)} did not answer Paris (compare the shipped {SHIPPED_TAG} file's answer)",
              file=sys.stderr)

    common = {"ids": ids, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "threads": args.threads, "attn": args.hf_attn}
    results = []
    with tempfile.TemporaryDirectory(prefix="cpu_decode-") as tmp:
        bar = tqdm(rows, unit="row", file=sys.stderr)
        for row in bar:
            bar.set_description(row["name"])
            result = summarize(row, run_worker(row, common, Path(tmp), args.threads), args.prompt_tokens, args.new_tokens)
            if "error" in result:
                tqdm.write(f"{row['name']} failed: {result['error']}\n  " + "\n  ".join(result["stderr_tail"]),
                           file=sys.stderr)
            results.append(result)
    add_ratios(results)
    info["load_average_at_end"] = load_average()
    for r in results:
        if len(r.get("decode_s", [])) > 1 and max(r["decode_s"]) > 1.15 * min(r["decode_s"]):
            print(f"warning: {r['name']} decode times vary by more than 15% over the repeats; "
                  "is something else using the CPU?", file=sys.stderr)

    if args.smoke:
        for r in results:
            if "tokens" in r:
                print(f"{r['name']:<20} continues: {tokenizer.decode(r['tokens'])!r}", file=sys.stderr)
    print(markdown_table(results))

    if args.out:
        report = {
            "benchmark": "cpu_decode",
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": info,
            "model": {"gguf": shipped.name, "sha256": sha256_file(shipped)},
            "prompt": {"text": PROMPT_TEXT.name, "text_sha256": sha256_file(PROMPT_TEXT), "tokens": args.prompt_tokens,
                       "ids": ids, "special_tokens_added": False},
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "smoke": args.smoke,
            "decode": "greedy, batch 1, no stop on EOS",
            "gguf_checks": checks,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
