"""The CLI reference (docs/cli-reference.md), generated from the click commands themselves,
so it cannot drift from what `arlec` and `arle-runtime` accept.

    python -m arlec.clidoc --out docs/cli-reference.md    # regenerate
    python -m arlec.clidoc --check docs/cli-reference.md  # exit 1 if it is stale

tests/test_docs_commands.py fails when the committed file differs from this output.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click

REGEN = "python -m arlec.clidoc --out docs/cli-reference.md"


def programs() -> list[tuple[str, click.Command]]:
    from arle_runtime.cli import cli as runtime_cli

    from .cli import cli as arlec_cli

    return [("arlec", arlec_cli), ("arle-runtime", runtime_cli)]


def walk(cmd: click.Command, path: list[str], parent: click.Context | None = None):
    """(path, command, context) for the command and every subcommand, depth first, sorted by name."""
    ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent, **cmd.context_settings)
    yield path, cmd, ctx
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            yield from walk(cmd.get_command(ctx, name), [*path, name], ctx)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(param: click.Parameter, ctx: click.Context) -> str:
    if isinstance(param, click.Option) and param.is_flag and not param.secondary_opts:
        return ""  # a plain flag is off unless given
    default = param.get_default(ctx, call=False)
    if callable(default):
        return "(computed)"
    if default is None or default == () or type(default).__name__ == "Sentinel":  # click 8.3+: UNSET
        return ""
    if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    return f"`{default}`"


def _option_row(param: click.Option, ctx: click.Context) -> str:
    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    value = "" if param.is_flag else param.make_metavar(ctx)
    help_text = param.help or ""
    if param.required:
        help_text = f"**Required.** {help_text}"
    if isinstance(param.type, click.Choice):
        value = "|".join(param.type.choices)
    if param.envvar:
        help_text += f" Environment: `${param.envvar}`."
    return f"| {names} | {_cell(value)} | {_default(param, ctx)} | {_cell(help_text)} |"


def command_section(path: list[str], cmd: click.Command, ctx: click.Context) -> str:
    depth = min(len(path) + 1, 4)
    lines = [f"{'#' * depth} {' '.join(path)}", ""]
    usage = " ".join([*path, *cmd.collect_usage_pieces(ctx)])
    lines += ["```text", usage, "```", ""]
    if cmd.help:
        lines += [inspect.cleandoc(cmd.help).replace("\b\n", ""), ""]
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    if args:
        lines += ["| argument | required |", "|---|---|"]
        lines += [f"| `{a.make_metavar(ctx)}` | {'yes' if a.required else 'no'} |" for a in args]
        lines.append("")
    options = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
    options += [p for p in [cmd.get_help_option(ctx)] if p is not None]
    if options:
        lines += ["| option | value | default | help |", "|---|---|---|---|"]
        lines += [_option_row(p, ctx) for p in options]
        lines.append("")
    if isinstance(cmd, click.Group):
        subs = sorted(cmd.list_commands(ctx))
        lines += ["Commands: " + ", ".join(f"`{' '.join([*path, s])}`" for s in subs) + ".", ""]
    return "\n".join(lines)


def render() -> str:
    out = [
        "# CLI reference",
        "",
        f"Generated from the click commands by `{REGEN}`; do not edit by hand",
        "(a test fails when this file differs from that output). The guide with examples is",
        "[cli.md](cli.md).",
        "",
    ]
    for prog, root in programs():
        for path, cmd, ctx in walk(root, [prog]):
            out.append(command_section(path, cmd, ctx))
    return "\n".join(out).rstrip("\n") + "\n"


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the reference here (default: standard output).")
@click.option("--check", type=click.Path(dir_okay=False), help="Exit 1 if this file differs from a fresh reference.")
def main(out, check):
    """Generate the CLI reference of `arlec` and `arle-runtime` as Markdown."""
    text = render()
    if check:
        current = Path(check).read_text() if Path(check).is_file() else ""
        if current != text:
            click.echo(f"{check} is stale; regenerate it with `{REGEN}`.", err=True)
            sys.exit(1)
        return
    if out:
        tmp = Path(out).with_name(f".{Path(out).name}.partial")  # never leave a half-written reference
        tmp.write_text(text)
        tmp.replace(out)
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":
    main()
