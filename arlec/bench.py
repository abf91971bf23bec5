"""`arlec bench` and `arlec regress`: a bundle's speed, as raw numbers and as ratios to a
reference measured in the same process, so results compare across noisy machines.

The run: one request at batch 1 through the runtime's engine (prefix cache off, greedy,
EOS ignored): a prompt of --prompt-tokens fixed token ids, then --new-tokens tokens. Each
token's arrival is timestamped as engine.step() hands it out. Per repeat:
  ttft_s          request submitted -> first token (prefill of the whole prompt + 1 sample);
                  the median of PREFILL_SAMPLES requests (the run's and prompt-only ones)
  prefill_tok_s   prompt tokens / ttft_s
  decode_tok_s    (new tokens - 1) / (last token time - first token time)
  itl p50 / p99   gaps between consecutive tokens
The median over --repeats runs (after one identical warm-up run) is reported;
peak_rss_bytes is the process's peak resident memory after the warm-up run (before the
reference's matrices are allocated).

The reference, plain eager torch on the same threads (on the GPU for a cuda bundle, where
peak_rss_bytes is still the host's and the GPU's peak allocation is reported beside it),
sampled for REFERENCE_SECONDS before
each run and after the last; each run's ratios use the mean of the samples around it, and
the reported ratio is the median over runs:
  gemv_bytes_s    an fp32 matrix-vector product (torch.mv) over a matrix as large as the
                  bundle's weights file (at most 1 GiB): the memory bandwidth that a decode
                  step, which reads every weight once, is bound by
  gemm_flop_s     an fp32 (prompt tokens x 1024) @ (1024 x 1024) matmul: the compute rate
                  that prefill is bound by
Neither is a roofline of the hardware: they are what plain torch gets on this machine, now.
Ratios (dimensionless; the numbers `arlec regress` compares):
  decode_tok_s  / (gemv_bytes_s / weight bytes)           higher is better
  itl_p50_s, itl_p99_s  * (gemv_bytes_s / weight bytes)    lower is better
  prefill_tok_s / (gemm_flop_s / (2 * parameters))         higher is better
  ttft_s * gemm_flop_s / (2 * parameters * prompt tokens)  lower is better
  peak_rss_bytes / weight bytes                            lower is better
"""

from __future__ import annotations

import datetime
import json
import platform
import resource
import statistics
import time
from pathlib import Path

from arle_runtime.errors import ArleError

BENCH_SCHEMA = 1
DEFAULT_TOLERANCE_PCT = 25.0
REFERENCE_MAX_BYTES = 1 << 30
PREFILL_SAMPLES = 3  # prefills per run (the run's own and prompt-only requests); TTFT is their median
REFERENCE_SECONDS = 0.6  # per sample; one sample before each run and one after the last
PROMPT_TEXT = (
    "The history of computing is a story of machines that grew smaller, faster and cheaper while the "
    "problems they were asked to solve grew larger. Early computers filled rooms and were programmed by "
    "rewiring panels; later ones read punched cards, then magnetic tape, then disks. "
)
# metric -> (unit, True when higher is better)
METRICS = {
    "prefill_tok_s": ("tok/s", True),
    "decode_tok_s": ("tok/s", True),
    "ttft_s": ("s", False),
    "itl_p50_s": ("s", False),
    "itl_p99_s": ("s", False),
    "peak_rss_bytes": ("B", False),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's ru_maxrss also counts the parent's
    resident memory at fork/exec (a bench run from a pytest that holds torch read 2x its
    own), so read the high-water mark of this process's own memory map, VmHWM."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if platform.system() == "Darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def prompt_ids(session, n: int) -> list[int]:
    base = session.encode(PROMPT_TEXT)
    return (base * (n // len(base) + 1))[:n]


def timed_request(engine, prompt: list[int], new_tokens: int) -> dict:
    """One request driven here, timed by when each of its tokens came out of step();
    with new_tokens 1 (a prefill-only sample) the decode numbers are nan."""
    from arle_runtime.sampler import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    rid = engine.add_request(prompt, params)
    stamps: list[float] = []
    done = None
    while done is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            if out.token is not None:
                stamps.append(time.perf_counter())
            if out.finished:
                done = out
    if done.error:
        raise ArleError(f"The benchmark request failed: {done.error}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    ttft = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": ttft,
        "prefill_tok_s": len(prompt) / ttft,
        "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s > 0 else float("nan"),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "tokens": len(stamps),
    }


class Reference:
    """Plain eager torch on the device the bundle runs on (the process's threads on a CPU,
    the GPU for a cuda bundle): an fp32 GEMV over a matrix the size of the weights (memory
    bandwidth) and an fp32 GEMM shaped like a prefill (compute rate)."""

    def __init__(self, weight_bytes: int, prompt_tokens: int, device=None):
        import torch

        self.device = torch.device(device or "cpu")
        rows = max(1024, min(weight_bytes, REFERENCE_MAX_BYTES) // (4 * 4096))
        new = dict(device=self.device)
        self.matrix, self.vector = torch.randn(rows, 4096, **new), torch.randn(4096, **new)
        self.a, self.b = torch.randn(max(prompt_tokens, 16), 1024, **new), torch.randn(1024, 1024, **new)
        self.threads = torch.get_num_threads()
        self.measure(0.05)  # fault the pages in, warm the kernels

    def _sync(self, fn):
        import torch

        if self.device.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize(self.device))  # time the kernel, not its launch

    def measure(self, seconds: float = REFERENCE_SECONDS) -> dict:
        """Median rates over about `seconds` of each kernel."""
        import torch

        mv = _repeat(self._sync(lambda: torch.mv(self.matrix, self.vector)), seconds / 2)
        mm = _repeat(self._sync(lambda: self.a @ self.b), seconds / 2)
        return {"gemv_bytes_s": self.matrix.numel() * 4 / mv, "gemm_flop_s": 2 * self.a.shape[0] * 1024 * 1024 / mm}

    def describe(self) -> dict:
        return {"gemv_matrix_bytes": self.matrix.numel() * 4, "gemm_shape": [self.a.shape[0], 1024, 1024],
                "threads": self.threads, "device": str(self.device)}


def _repeat(fn, seconds: float) -> float:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        times.append(_time(fn))
    return statistics.median(times)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ratios(metrics: dict, ref: dict, weight_bytes: int, parameters: int, prompt_tokens: int) -> dict:
    ideal_decode = ref["gemv_bytes_s"] / weight_bytes  # steps/s if a step only read the weights once
    ideal_prefill = ref["gemm_flop_s"] / (2 * parameters)  # tokens/s at the reference compute rate
    return {
        "prefill_tok_s": metrics["prefill_tok_s"] / ideal_prefill,
        "decode_tok_s": metrics["decode_tok_s"] / ideal_decode,
        "ttft_s": metrics["ttft_s"] * ideal_prefill / prompt_tokens,
        "itl_p50_s": metrics["itl_p50_s"] * ideal_decode,
        "itl_p99_s": metrics["itl_p99_s"] * ideal_decode,
        "peak_rss_bytes": metrics["peak_rss_bytes"] / weight_bytes,
    }


def run_bench(bundle: str, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3, echo=print) -> dict:
    from tqdm import tqdm

    from arle_runtime.engine import EngineConfig
    from arle_runtime.session import Session

    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise ArleError("--prompt-tokens must be at least 1, --new-tokens at least 2 and --repeats at least 1.")
    session = Session.open(bundle, engine_config=EngineConfig(max_batch=1, prefix_cache=False))
    limits = session.executor.limits
    if prompt_tokens + new_tokens > limits.max_context:
        raise ArleError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the bundle's context of "
            f"{limits.max_context} tokens; ask for fewer."
        )
    manifest = session.bundle.manifest
    weight_bytes = (session.bundle.root / manifest["weights"]["path"]).stat().st_size
    parameters = manifest["model"]["num_parameters"]
    prompt = prompt_ids(session, prompt_tokens)
    engine = session.engine
    timed_request(engine, prompt, new_tokens)  # warm-up: first-call costs out of the numbers
    rss = peak_rss_bytes()  # before the reference's matrices exist; the measured runs repeat the warm-up
    reference = Reference(weight_bytes, prompt_tokens, session.executor.device)
    # The reference is sampled around every run and each run is normalized by the mean of
    # its two neighbours, so load that comes and goes on a shared machine hits both alike.
    samples = [reference.measure()]
    runs = []
    for _ in tqdm(range(repeats), desc="bench", unit="run", disable=None, leave=False):
        run = timed_request(engine, prompt, new_tokens)
        # One prefill is one long step, the noisiest number here: take the median of a few.
        ttfts = [run["ttft_s"]] + [timed_request(engine, prompt, 1)["ttft_s"] for _ in range(PREFILL_SAMPLES - 1)]
        run["ttft_s"] = statistics.median(ttfts)
        run["prefill_tok_s"] = len(prompt) / run["ttft_s"]
        runs.append(run)
        samples.append(reference.measure())
    per_run = []
    for run, before, after in zip(runs, samples, samples[1:]):
        ref = {k: (before[k] + after[k]) / 2 for k in before}
        per_run.append(ratios({**run, "peak_rss_bytes": rss}, ref, weight_bytes, parameters, prompt_tokens))
    metrics = {name: statistics.median(r[name] for r in runs) for name in METRICS if name != "peak_rss_bytes"}
    metrics["peak_rss_bytes"] = rss
    ref = {**{k: statistics.median(s[k] for s in samples) for k in samples[0]}, **reference.describe()}
    import torch

    return {
        "schema": BENCH_SCHEMA,
        "bundle": {"path": str(session.bundle.root), "name": session.bundle.name, "target": session.bundle.target,
                   "quantization": manifest["quantization"]["scheme"], "weight_bytes": weight_bytes,
                   "parameters": parameters},
        "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "batch": 1},
        "machine": {"arch": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), **cpu_facts(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "metrics": metrics,
        "reference": ref,
        "ratios": {name: statistics.median(r[name] for r in per_run) for name in METRICS},
        "runs": runs,
        **gpu_facts(session.executor.device),
    }


# SIMD features that decide how fast the int8/bf16 CPU kernels run next to the fp32 reference:
# the same code measured 0.27 decode ratio on one x86 host and 0.19 on an AVX2-only one.
CPU_FEATURES = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_facts() -> dict:
    """The CPU's model name and its relevant SIMD features (Linux's /proc/cpuinfo; else what
    platform knows), recorded so `regress` can say when a baseline came from another kind of CPU."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                name = value.strip()
            elif key in ("flags", "Features"):
                flags = set(value.split())
            if name and flags:
                break
    except OSError:
        pass
    return {"cpu": name, "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def other_cpu_note(baseline: dict, current: dict) -> str | None:
    """A one-line note when the baseline was made on another kind of CPU (None when the same,
    or when the baseline predates the record)."""
    then, now = baseline.get("machine", {}), current.get("machine", {})
    if "cpu_features" not in then:
        return None
    if (then.get("cpu"), then["cpu_features"]) == (now.get("cpu"), now.get("cpu_features")):
        return None
    def describe(m: dict) -> str:
        return f"{m.get('cpu')} ({', '.join(m.get('cpu_features') or ['no listed SIMD features'])})"
    return (f"note: the baseline was made on {describe(then)}, this run is on {describe(now)}; ratios move "
            "between kinds of CPU (baselines/README.md), so remake the baseline on this kind to compare code")


def gpu_facts(device) -> dict:
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return {}
    return {"gpu": {"name": torch.cuda.get_device_name(device),
                    "peak_allocated_bytes": torch.cuda.max_memory_allocated(device)}}


def _fmt(name: str, value: float) -> str:
    unit = METRICS[name][0]
    if unit == "s":
        return f"{value * 1000:.1f} ms"
    if unit == "B":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:.1f} {unit}"


def bench_table(result: dict) -> str:
    ref = result["reference"]
    lines = [f"{'metric':<16}{'value':>14}{'ratio':>10}"]
    for name, (_, higher) in METRICS.items():
        lines.append(f"{name:<16}{_fmt(name, result['metrics'][name]):>14}{result['ratios'][name]:>10.3f}  "
                     f"{'(higher is better)' if higher else '(lower is better)'}")
    lines.append(
        f"\nreference (eager torch, {ref['threads']} threads): fp32 GEMV {ref['gemv_bytes_s'] / 1e9:.1f} GB/s over "
        f"{ref['gemv_matrix_bytes'] / 2**20:.0f} MiB, fp32 GEMM {ref['gemm_flop_s'] / 1e9:.1f} GFLOP/s"
    )
    lines.append("ratios: tok/s and latencies against what the reference rates predict for this model's weights "
                 "(decode: bytes/s, prefill: FLOP/s); memory against the weights file")
    return "\n".join(lines)


def read_baseline(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ArleError(f"Baseline {p} does not exist; make one with `arlec bench BUNDLE --out {p}`.")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArleError(f"Baseline {p} is not valid JSON ({e}); remake it with `arlec bench --out`.") from None
    if not isinstance(data, dict) or data.get("schema") != BENCH_SCHEMA or not isinstance(data.get("ratios"), dict):
        raise ArleError(f"Baseline {p} is not an `arlec bench` result of schema {BENCH_SCHEMA}; remake it.")
    return data


def compare(current: dict, baseline: dict, tolerance_pct: float) -> list[dict]:
    """One row per metric: the ratios, the change (positive = worse) and whether it regressed."""
    rows = []
    for name, (_, higher) in METRICS.items():
        base, now = baseline["ratios"].get(name), current["ratios"][name]
        if base is None or not base > 0:
            continue
        worse_pct = (base / now - 1) * 100 if higher else (now / base - 1) * 100
        rows.append({"metric": name, "baseline": base, "current": now, "worse_pct": worse_pct,
                     "regressed": worse_pct > tolerance_pct})
    return rows


def best_rows(previous: list[dict] | None, rows: list[dict]) -> list[dict]:
    """Per metric, the better of two comparisons (`regress --best-of`): load on a shared machine
    makes a run look slower, rarely faster, so a metric only fails when it is slow every time."""
    if previous is None:
        return rows
    before = {r["metric"]: r for r in previous}
    return [min(r, before.get(r["metric"], r), key=lambda x: x["worse_pct"]) for r in rows]


def compare_table(rows: list[dict], tolerance_pct: float) -> str:
    lines = [f"{'metric':<16}{'baseline':>10}{'current':>10}{'worse by':>10}  verdict"]
    for r in rows:
        verdict = "REGRESSED" if r["regressed"] else "ok"
        lines.append(f"{r['metric']:<16}{r['baseline']:>10.3f}{r['current']:>10.3f}{r['worse_pct']:>9.1f}%  {verdict}")
    bad = sum(r["regressed"] for r in rows)
    lines.append(f"\n{bad} of {len(rows)} ratio metrics worse than the baseline by more than {tolerance_pct:g}%")
    return "\n".join(lines)
