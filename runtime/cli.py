"""`arle-runtime`: run (and later serve, agent, train) a bundle."""

from __future__ import annotations

import json
import signal
import sys

import click

from .errors import ArleError


def _interrupt(signum, frame):
    # SIGTERM behaves like Ctrl-C so cleanup (temp bundle folders, servers) runs.
    raise KeyboardInterrupt


def guarded(command: click.Group, prog: str):
    """Run a click group: ArleError -> one line on stderr and exit 2; Ctrl-C -> exit 130."""

    def main(argv=None):
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            command.main(args=argv, prog_name=prog, standalone_mode=False)
        except ArleError as e:
            click.echo(f"{prog}: error: {e.message}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo(f"{prog}: interrupted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo(f"\n{prog}: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except OSError as e:
            if getattr(e, "errno", None) == 32:  # broken pipe (e.g. `| head`): not an error
                sys.exit(0)
            click.echo(f"{prog}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)

    return main


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="arle-runtime")
def cli():
    """Load arle bundles and run them."""


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt", help="The user message (or raw text with --raw).")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the prompt from standard input.")
@click.option("--raw", is_flag=True, help="Complete the text as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--max-tokens", default=256, show_default=True, type=int, help="Most new tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 disables top-k.")
@click.option("--seed", default=None, type=int, help="Seed for sampling (same seed, same text).")
@click.option("--system", default=None, help="A system message to put first (chat mode).")
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the bundle files at load.")
def run(bundle, prompt, from_stdin, raw, as_json, max_tokens, temperature, top_p, top_k, seed, system, no_verify):
    """Generate one answer from BUNDLE."""
    from .session import Session
    from .sampler import SamplingParams

    if (prompt is None) == (not from_stdin):
        raise ArleError("Give exactly one of --prompt TEXT or --stdin.")
    text = sys.stdin.read() if from_stdin else prompt
    if not text.strip():
        raise ArleError("The prompt is empty; give some text with --prompt or on standard input.")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    session = Session.open(bundle, verify=not no_verify)
    if raw:
        prompt_ids = session.encode(text)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_ids = session.encode_chat(messages)
    stream = None if as_json else (lambda delta: (sys.stdout.write(delta), sys.stdout.flush()))
    result = session.generate(prompt_ids, params, on_text=stream)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "finish_reason": result.finish_reason,
                    "ttft_ms": round(result.ttft_s * 1000, 1),
                    "decode_tok_s": round(result.decode_tok_s, 1),
                    "bundle": session.bundle.name,
                }
            )
        )
    else:
        sys.stdout.write("\n")


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="ARLE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (also from $ARLE_API_KEY).")
@click.option("--max-batch", default=None, type=int, help="Most requests running at once (default: the bundle's).")
@click.option("--max-queue", default=1024, show_default=True, type=int,
              help="Most requests waiting; more are answered 429.")
@click.option("--timeout", "request_timeout", default=600.0, show_default=True, type=float,
              help="Seconds a request may take before it is cancelled.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the bundle files at load.")
def serve(bundle, host, port, api_key, max_batch, max_queue, request_timeout, no_verify):
    """Serve BUNDLE over an OpenAI-compatible HTTP API."""
    from .engine import EngineConfig
    from .server import serve as run_server
    from .session import Session

    if max_batch is not None and max_batch < 1:
        raise ArleError(f"--max-batch must be at least 1, got {max_batch}.")
    if max_queue < 1:
        raise ArleError(f"--max-queue must be at least 1, got {max_queue}.")
    if request_timeout <= 0:
        raise ArleError(f"--timeout must be positive, got {request_timeout:g}.")
    config = EngineConfig(max_batch=max_batch, max_waiting=max_queue)
    session = Session.open(bundle, verify=not no_verify, engine_config=config)
    run_server(session, host, port, api_key=api_key, request_timeout=request_timeout)


main = guarded(cli, "arle-runtime")
