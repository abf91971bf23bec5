"""`arlec`: build, inspect and verify bundles."""

from __future__ import annotations

import json

import click

from arle_runtime.cli import guarded

from . import __version__
from .quant import SCHEMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arlec")
def cli():
    """The arle compiler: lower a model, a quantization and a target into a bundle."""


@cli.command()
@click.option("--model", default=None, help="HF folder or .gguf file; default: the embedded SmolLM2-135M-Instruct.")
@click.option("--quant", default="int8", show_default=True, help=f"One of {', '.join(SCHEMES)}.")
@click.option("--group-size", default=32, show_default=True, type=int, help="int4 group size.")
@click.option("--target", default="cpu", show_default=True, help="Target to compile for.")
@click.option("--out", default=None, help="Bundle folder; default build/<model>-<quant>-<target>.arle.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--max-batch", default=8, show_default=True, type=int, help="Largest decode batch.")
@click.option("--max-prefill-tokens", default=None, type=int, help="Largest prefill chunk; default min(512, context).")
@click.option("--max-context", default=None, type=int, help="Longest sequence; default min(model, 4096).")
def build(model, quant, group_size, target, out, force, max_batch, max_prefill_tokens, max_context):
    """Build a bundle."""
    from .build import BuildOptions
    from .build import build as run_build

    opts = BuildOptions(model, quant, group_size, target, out, force, max_batch, max_prefill_tokens, max_context)
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


main = guarded(cli, "arlec")
