"""`arlec`: build, inspect and verify bundles."""

from __future__ import annotations

import json
from pathlib import Path

import click

from arle_runtime.errors import ArleError

from arle_runtime.cli import guarded

from . import __version__
from .quant import SCHEMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arlec")
def cli():
    """The arle compiler: lower a model, a quantization and a target into a bundle."""


@cli.command()
@click.option("--model", default=None, help="HF folder or .gguf file; default: the embedded SmolLM2-135M-Instruct.")
@click.option("--quant", default=None,
              help=f"One of {', '.join(SCHEMES)}; default int8 for cpu, bf16 for cuda, fp32 for onnx and metal.")
@click.option("--group-size", default=32, show_default=True, type=int, help="int4 group size.")
@click.option("--target", default="cpu", show_default=True, help="Target to compile for.")
@click.option("--out", default=None, help="Bundle folder; default build/<model>-<quant>-<target>.arle.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest decode batch.")
@click.option("--max-prefill-tokens", default=None, type=int, help="Largest prefill chunk; default min(512, context).")
@click.option("--max-context", default=None, type=int, help="Longest sequence; default min(model, 4096).")
@click.option("--kv-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "bf16", "fp16", "fp32", "fp8"]),
              help="KV cache dtype: auto = the compute dtype; fp8 (e4m3) halves the cache on cuda.")
@click.option("--tp", default=1, show_default=True, type=int,
              help="Tensor-parallel ranks: split the model over this many GPUs (processes on cpu).")
def build(model, quant, group_size, target, out, force, max_batch, max_prefill_tokens, max_context, kv_dtype, tp):
    """Build a bundle."""
    from .build import BuildOptions
    from .build import build as run_build

    opts = BuildOptions(model, quant, group_size, target, out, force, max_batch, max_prefill_tokens, max_context,
                        kv_dtype=kv_dtype, tp=tp)
    path, info = run_build(opts)
    manifest = info["manifest"]
    size = sum(a["size"] for a in manifest["artifacts"])
    click.echo(f"\n{'stage':<28}{'seconds':>9}")
    for stage, secs in info["timings"].items():
        click.echo(f"{stage:<28}{secs:>9.1f}")
    click.echo(f"{'total':<28}{info['seconds']:>9.1f}")
    click.echo(
        f"\nbuilt {path}  ({manifest['quantization']['scheme']}, {manifest['target']['name']}, {size / 2**20:.1f} MiB)"
    )


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle, as_json):
    """Summarize a bundle's manifest."""
    from .inspect_bundle import inspect as read, summary_rows

    root, manifest = read(bundle)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    for key, value in summary_rows(root, manifest):
        click.echo(f"{key:<14}{value}")


@cli.command()
@click.argument("bundle", type=click.Path())
def verify(bundle):
    """Re-check checksums and reproduce the bundle's reference outputs."""
    from .inspect_bundle import verify as run_verify

    run_verify(bundle, echo=click.echo)
    click.echo("verified")


@cli.command()
@click.option("--bundle", default=None, help="Also check that this bundle can load here (files present, same torch, same CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--strict", is_flag=True, help="Exit 1 on a warning too, not only on a failure.")
def doctor(bundle, as_json, strict):
    """Check this machine: Python, torch, CUDA and GPUs, optional backends, sandbox, disk."""
    from .doctor import as_dict, exit_code, run_checks, table

    findings = run_checks(bundle)
    if as_json:
        click.echo(json.dumps(as_dict(findings, strict), indent=2))
    else:
        click.echo(table(findings))
    raise SystemExit(exit_code(findings, strict))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--out", required=True, help="Folder for the Docker build context.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--ray", is_flag=True,
              help="Also write serve-config.yaml: --replicas copies behind one Ray Serve endpoint.")
@click.option("--k8s", is_flag=True, help="Also write k8s.yaml: a Deployment of --replicas pods and a Service.")
@click.option("--replicas", default=None, type=int, help="With --ray or --k8s: how many copies (default 2).")
def package(bundle, out, force, ray, k8s, replicas):
    """Write a Docker build context that serves BUNDLE (Dockerfile, requirements, wheel, bundle)."""
    from .package import package as run_package

    if replicas is not None and not (ray or k8s):
        raise ArleError("--replicas goes with --ray or --k8s (the scale-out files it sizes).")
    info = run_package(bundle, out, force, echo=click.echo, ray=ray, k8s=k8s,
                       replicas=2 if replicas is None else replicas)
    click.echo(
        f"wrote {info['out']}  ({info['target']}, {info['bytes'] / 2**20:.1f} MiB, {info['wheel']})\n"
        f"docker build -t {info['image']} {info['out']} && docker run -p 8000:8000 {info['image']}"
    )
    if "serve-config.yaml" in info["scale_out"]:
        click.echo(f"Ray Serve: serve deploy {info['out']}/serve-config.yaml --address http://HEAD:8265 "
                   "(docs/scale-out.md)")
    if "k8s.yaml" in info["scale_out"]:
        click.echo(f"Kubernetes: push the image, set its name in {info['out']}/k8s.yaml, kubectl apply -f it")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--out", default=None, help="Also write the JSON result here (a baseline for `arlec regress`).")
@click.option("--prompt-tokens", default=128, show_default=True, type=int, help="Prompt length in tokens.")
@click.option("--new-tokens", default=64, show_default=True, type=int, help="Tokens to generate per run.")
@click.option("--repeats", default=3, show_default=True, type=int, help="Measured runs (the median is reported).")
def bench(bundle, as_json, out, prompt_tokens, new_tokens, repeats):
    """Measure prefill/decode tok/s, TTFT, inter-token latency and peak memory, also as ratios
    to an eager-torch GEMV/GEMM reference run in the same process."""
    from .bench import bench_table, run_bench

    result = run_bench(bundle, prompt_tokens, new_tokens, repeats)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2) if as_json else bench_table(result))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--baseline", required=True, help="A JSON result of `arlec bench --out`.")
@click.option("--tolerance", default=25.0, show_default=True, type=float, help="Percent a ratio may be worse.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object.")
@click.option("--best-of", default=1, show_default=True, type=int,
              help="Rerun the bench up to N times while a ratio is beyond --tolerance; each keeps its best.")
def regress(bundle, baseline, tolerance, as_json, best_of):
    """Rerun the bench with the baseline's settings; exit 1 if a ratio is worse beyond --tolerance."""
    from .bench import best_rows, compare, compare_table, other_cpu_note, read_baseline, run_bench

    if tolerance < 0:
        raise ArleError("--tolerance must be a percentage of 0 or more.")
    if best_of < 1:
        raise ArleError(f"--best-of must be at least 1, got {best_of}.")
    base = read_baseline(baseline)
    s = base["settings"]
    rows, runs = None, 0
    while runs < best_of and (rows is None or any(r["regressed"] for r in rows)):
        current = run_bench(bundle, s["prompt_tokens"], s["new_tokens"], s["repeats"])
        rows, runs = best_rows(rows, compare(current, base, tolerance)), runs + 1
    if current["machine"]["threads"] != base["machine"]["threads"]:
        click.echo(f"note: the baseline ran on {base['machine']['threads']} threads, this run on "
                   f"{current['machine']['threads']} (set ARLE_THREADS to match)", err=True)
    note = other_cpu_note(base, current)
    if note:
        click.echo(note, err=True)
    regressed = any(r["regressed"] for r in rows)
    if as_json:
        click.echo(json.dumps({"tolerance_pct": tolerance, "regressed": regressed, "runs": runs, "rows": rows},
                              indent=2))
    else:
        click.echo(compare_table(rows, tolerance) + (f" (best of {runs} runs)" if runs > 1 else ""))
    raise SystemExit(1 if regressed else 0)


main = guarded(cli, "arlec")
