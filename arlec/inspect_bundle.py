"""`arlec inspect` and `arlec verify`: read a bundle back and check it."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from arle_runtime.bundle import load_bundle, read_manifest, verify_artifacts
from arle_runtime.errors import ArleError
from arle_runtime.executor import load_executor
from arle_runtime.generate import greedy_continuation, prefill


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def summary_rows(root: Path, manifest: dict) -> list[tuple[str, str]]:
    m, q, t, b = manifest["model"], manifest["quantization"], manifest["target"], manifest["buckets"]
    cfg = m["config"]
    total = sum(a["size"] for a in manifest["artifacts"])
    src = manifest.get("provenance", {}).get("source", {})
    quant = q["scheme"] + (f" (group {q['group_size']})" if "group_size" in q else "")
    return [
        ("bundle", str(root)),
        ("schema", str(manifest["schema_version"])),
        ("model", f"{m['architecture']}, {m['num_parameters'] / 1e6:.1f}M parameters, {cfg['num_layers']} layers, "
                  f"hidden {cfg['hidden_size']}, {cfg['num_heads']}/{cfg['num_kv_heads']} heads, vocab {cfg['vocab_size']}"),
        ("source", f"{src.get('kind')} {src.get('name', '')} sha256 {str(src.get('sha256', ''))[:12]}"),
        ("quantization", f"{quant}, compute {q['compute_dtype']}"),
        ("target", f"{t['name']} ({t['executor']}), needs {', '.join(f'{k} {v}' for k, v in t['requirements'].items())}"),
        ("programs", ", ".join(f"{n}: batch {p['batch'][0]}-{p['batch'][1]}, tokens {p['tokens'][0]}-{p['tokens'][1]}"
                               for n, p in manifest["programs"].items())),
        ("buckets", f"decode batch {b['decode_batch_sizes']}, prefill chunk {b['max_prefill_tokens']}, context {b['max_context']}"),
        ("kv cache", f"{manifest['kv_cache']['dtype']}, page size {manifest['kv_cache']['page_size']}"),
        ("size", f"{human_bytes(total)} in {len(manifest['artifacts'])} files"),
        ("built", f"{manifest['provenance'].get('built_at')} by arlec {manifest['provenance'].get('arlec_version')} "
                  f"in {manifest['provenance'].get('build_seconds')} s"),
    ]


def inspect(path: str) -> tuple[Path, dict]:
    root = Path(path)
    return root, read_manifest(root)


def verify(path: str, echo=print) -> dict:
    """Re-check every checksum, then run the compiled steps against the stored reference."""
    root = Path(path)
    manifest = read_manifest(root)
    t = time.perf_counter()
    verify_artifacts(root, manifest, hashes=True)
    echo(f"checksums   ok  ({len(manifest['artifacts'])} files, {time.perf_counter() - t:.1f} s)")
    bundle = load_bundle(root, verify=False)
    executor = load_executor(bundle)
    ref = load_file(str(root / manifest["reference"]["path"]))
    prompt = ref["prompt_ids"].tolist()
    with torch.no_grad():
        logits, k, v, *state = prefill(executor, prompt)
        err = float((logits.float().cpu() - ref["last_logits"]).abs().max())
        greedy = greedy_continuation(executor.decode, logits, k, v, len(prompt), len(ref["greedy_ids"]), state)
    expected = ref["greedy_ids"].tolist()
    margins = ref["greedy_margins"].tolist() if "greedy_margins" in ref else None  # bundles before 2026-12-07 lack it
    tol = manifest["reference"]["logits_atol"]
    greedy_ok, detail = greedy_agrees(greedy, expected, margins, tol)
    result = {"checksums": True, "max_logit_error": err, "tolerance": tol, "greedy_match": greedy == expected,
              "greedy_ok": greedy_ok}
    echo(f"logits      {'ok' if err <= tol else 'FAIL'}  (max |compiled - reference| = {err:.2e}, tolerance {tol:g})")
    echo(f"greedy      {'ok' if greedy_ok else 'FAIL'}  ({len(expected)} tokens{detail})")
    paged_ok = True
    if getattr(executor, "paged", False):  # each paged decode program too, through the engine
        programs = list(getattr(executor, "decode_programs", ["decode_paged"]))
        for program in programs:
            if len(programs) > 1:
                executor.run_only(program)
            paged = paged_greedy(executor, bundle, prompt, len(expected))
            result[f"{program}_greedy_match"] = paged == expected
            ok, detail = greedy_agrees(paged, expected, margins, tol)
            paged_ok = paged_ok and ok
            echo(f"{program.removeprefix('decode_'):<11} {'ok' if ok else 'FAIL'}  (greedy through the engine's "
                 f"{program} program{detail})")
        if len(programs) > 1:
            executor.run_only(None)
    if err > tol or not greedy_ok or not paged_ok:
        raise ArleError(f"Bundle {root} does not reproduce its reference outputs; rebuild it.")
    return result


def greedy_agrees(got: list[int], expected: list[int], margins: list[float] | None, tol: float) -> tuple[bool, str]:
    """Whether compiled greedy tokens agree with the reference's, and a note saying how.
    Equal, or equal up to a step where the reference's own top two logits were no further
    apart than the logit tolerance: there the choice is a tie at the compute precision
    (random bf16 models have exact ties), decided by rounding, and the continuations part.
    Without stored margins (older bundles) only equal tokens pass."""
    if got == expected:
        return True, ""
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    if margins is not None and first < len(margins) and len(got) == len(expected) and margins[first] <= tol:
        return True, (f"; equal up to token {first}, where the reference's top two logits were {margins[first]:.3g} "
                      f"apart, within the tolerance {tol:g}: a tie at this precision")
    why = "" if margins is None or first >= len(margins) else f" (reference margin there {margins[first]:.3g})"
    return False, f": {got} != {expected}, first difference at token {first}{why}"


def paged_greedy(executor, bundle, prompt: list[int], count: int) -> list[int]:
    """Greedy tokens through the engine, i.e. the executor's paged decode program."""
    from arle_runtime.engine import Engine, EngineConfig
    from arle_runtime.sampler import SamplingParams

    engine = Engine(executor, bundle.tokenizer, (), EngineConfig(max_batch=1))
    params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True)
    return engine.generate([prompt], params)[0].token_ids
