"""`arle-runtime`: run (and later serve, agent, train) a bundle."""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from .errors import ArleError
from .preload import reexec_with_system_libstdcxx


def _interrupt(signum, frame):
    # SIGTERM behaves like Ctrl-C so cleanup (temp bundle folders, servers) runs.
    raise KeyboardInterrupt


def guarded(command: click.Group, prog: str):
    """Run a click group: ArleError -> one line on stderr and exit 2; Ctrl-C -> exit 130."""

    def main(argv=None):
        if argv is None:  # a real command line, not a test calling main([...]) in-process
            reexec_with_system_libstdcxx()
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


KV_PAGES_HELP = ("KV cache size in pages of 16 positions (default: room for --max-batch full-context "
                 "sequences, at most 1 GiB).")


def _check_kv_pages(kv_pages: int | None) -> None:
    if kv_pages is not None and kv_pages < 1:
        raise ArleError(f"--kv-pages must be at least 1, got {kv_pages}.")


def _check_kv_memory(session, kv_pages: int | None) -> None:
    """A pool larger than the device's memory fails here with a sentence, not later in an allocator."""
    if kv_pages is None:
        return
    import torch

    from .engine.kv_pages import PAGE_SIZE
    from .engine.model_runner import KVLayout

    device = session.executor.device
    if device.type == "cpu":
        have, where = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's memory"
    elif device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], f"free memory on {device}"
    else:
        return
    need = KVLayout.of(session.executor).bytes_per_token * PAGE_SIZE * kv_pages
    if need > have:
        raise ArleError(f"--kv-pages {kv_pages} needs {need / 2**30:.1f} GiB of KV cache, more than the "
                        f"{have / 2**30:.1f} GiB of {where}.")


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
@click.option("--kv-pages", default=None, type=int, help=KV_PAGES_HELP)
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the bundle files at load.")
@click.option("--tools/--no-tools", default=False, show_default=True,
              help="Let the model call the sandboxed python and shell tools (docs/agent.md).")
@click.option("--max-turns", default=4, show_default=True, type=int, help="With --tools: most model turns.")
@click.option("--unsafe-tools", is_flag=True, help="With --tools: run them WITHOUT a sandbox.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False), help="With --tools: the tools' work dir.")
def run(bundle, prompt, from_stdin, raw, as_json, max_tokens, temperature, top_p, top_k, seed, system, kv_pages,
        no_verify, tools, max_turns, unsafe_tools, workdir):
    """Generate one answer from BUNDLE."""
    from .engine import EngineConfig
    from .session import Session
    from .sampler import SamplingParams

    if (prompt is None) == (not from_stdin):
        raise ArleError("Give exactly one of --prompt TEXT or --stdin.")
    text = sys.stdin.read() if from_stdin else prompt
    if not text.strip():
        raise ArleError("The prompt is empty; give some text with --prompt or on standard input.")
    _check_kv_pages(kv_pages)
    sandbox = None
    if tools:  # checked before the bundle loads: a sandbox we cannot have fails fast
        from .agent.commands import check_tool_options, make_sandbox

        if raw:
            raise ArleError("--tools needs the chat template; drop --raw.")
        check_tool_options(max_turns)
        sandbox = make_sandbox(workdir, unsafe_tools)
        sandbox.require()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    # One answer needs one decode bucket: capture CUDA graphs as batches need them (cuda bundles).
    os.environ.setdefault("ARLE_CUDA_GRAPHS", "lazy")
    session = Session.open(bundle, verify=not no_verify, engine_config=EngineConfig(kv_pages=kv_pages))
    _check_kv_memory(session, kv_pages)
    if sandbox is not None:
        from .agent.commands import run_with_tools

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return run_with_tools(session, messages, params, as_json=as_json, sandbox=sandbox, max_turns=max_turns)
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
                    "tool_calls_executed": 0,
                    "turns": 1,
                }
            )
        )
    else:
        sys.stdout.write("\n")


@cli.command()
@click.argument("bundle", required=False, type=click.Path())
@click.option("--url", default=None, help="Talk to an OpenAI-compatible server instead of loading a BUNDLE.")
@click.option("--api-key", default=None, envvar="ARLE_API_KEY", help="With --url: the server's key ($ARLE_API_KEY).")
@click.option("--model", default=None, help="With --url: the model to ask (default: the server's first).")
@click.option("--system", default=None, help="A system message to put first.")
@click.option("--max-tokens", default=512, show_default=True, type=int, help="Most new tokens per answer.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 disables top-k (local bundles).")
@click.option("--seed", default=None, type=int)
@click.option("--tools/--no-tools", default=True, show_default=True, help="The sandboxed python and shell tools.")
@click.option("--unsafe-tools", is_flag=True, help="Run the tools WITHOUT a sandbox (when bubblewrap is missing).")
@click.option("--max-turns", default=4, show_default=True, type=int, help="Most model turns per message.")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="The tools' writable folder (default: a new temporary one).")
@click.option("--tool-timeout", default=10.0, show_default=True, type=float, help="Wall-clock seconds per tool run.")
@click.option("--tool-memory", default=512, show_default=True, type=int, help="MiB of memory per tool process.")
@click.option("--kv-pages", default=None, type=int, help=KV_PAGES_HELP)
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the bundle files at load.")
def agent(bundle, url, api_key, model, system, max_tokens, temperature, top_p, top_k, seed, tools, unsafe_tools,
          max_turns, workdir, tool_timeout, tool_memory, kv_pages, no_verify):
    """Chat with BUNDLE (or --url) in a REPL; the model may run sandboxed python and shell."""
    from .agent.commands import run_agent
    from .engine import EngineConfig
    from .sampler import SamplingParams

    _check_kv_pages(kv_pages)
    if max_tokens < 1:
        raise ArleError(f"--max-tokens must be at least 1, got {max_tokens}.")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    run_agent(bundle=bundle, url=url, api_key=api_key, model=model, system=system, params=params, tools=tools,
              unsafe_tools=unsafe_tools, max_turns=max_turns, workdir=workdir, tool_timeout=tool_timeout,
              tool_memory=tool_memory, engine_config=EngineConfig(kv_pages=kv_pages), verify=not no_verify)


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
@click.option("--kv-pages", default=None, type=int, help=KV_PAGES_HELP)
@click.option("--max-batched-tokens", default=None, type=int,
              help="Tokens fed per engine step, decodes and prefill chunks together (default: max batch + the "
                   "bundle's prefill chunk; on cuda max batch + 2048). Lower it to cut the inter-token latency spikes of long prefills.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the bundle files at load.")
@click.option("--engine-process/--one-process", default=True, show_default=True,
              help="Run the engine in a process of its own, so the HTTP layer and the engine loop do not share "
                   "one Python GIL (--one-process: both in this process, as before).")
@click.option("--http-processes", default=1, show_default=True, type=int,
              help="HTTP processes in front of the engine process, sharing the port. One spends ~85 us of CPU per "
                   "streamed token, which caps a GPU server at high concurrency; more lift that cap.")
def serve(bundle, host, port, api_key, max_batch, max_queue, request_timeout, kv_pages, max_batched_tokens, no_verify,
          engine_process, http_processes):
    """Serve BUNDLE over an OpenAI-compatible HTTP API."""
    from functools import partial

    from .engine import EngineConfig
    from .server import serve as run_server

    if max_batch is not None and max_batch < 1:
        raise ArleError(f"--max-batch must be at least 1, got {max_batch}.")
    if max_queue < 1:
        raise ArleError(f"--max-queue must be at least 1, got {max_queue}.")
    if request_timeout <= 0:
        raise ArleError(f"--timeout must be positive, got {request_timeout:g}.")
    if http_processes < 1:
        raise ArleError(f"--http-processes must be at least 1, got {http_processes}.")
    if http_processes > 1 and not engine_process:
        raise ArleError("--http-processes above 1 needs the engine in a process of its own; drop --one-process.")
    _check_kv_pages(kv_pages)
    config = EngineConfig(max_batch=max_batch, max_waiting=max_queue, kv_pages=kv_pages,
                          max_num_batched_tokens=max_batched_tokens)
    open_session = partial(open_serving_session, bundle, not no_verify, config)
    if http_processes > 1:
        from .http_processes import serve_processes

        serve_processes(bundle, open_session, http_processes, host, port, api_key=api_key,
                        request_timeout=request_timeout)
        return
    if engine_process:
        from .engine_process import RemoteSession

        session = RemoteSession.start(bundle, open_session)
    else:
        session = open_session()
    run_server(session, host, port, api_key=api_key, request_timeout=request_timeout)


def open_serving_session(bundle, verify: bool, config):
    """Load BUNDLE for `serve` and check the engine settings against it (in the engine's process)."""
    from .session import Session

    session = Session.open(bundle, verify=verify, engine_config=config)
    batch = config.max_batch or session.limits.max_batch
    if config.max_num_batched_tokens is not None and config.max_num_batched_tokens < batch:
        raise ArleError(f"--max-batched-tokens must be at least the batch size ({batch}): every running "
                        f"request decodes one token per step; got {config.max_num_batched_tokens}.")
    _check_kv_memory(session, config.kv_pages)
    return session


@cli.command("serve-ray")
@click.argument("bundle", type=click.Path())
@click.option("--replicas", default=2, show_default=True, type=int, help="Copies of the engine behind the endpoint.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the endpoint listens on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--address", default=None,
              help="Join this Ray cluster ('auto', or HOST:PORT of its head) instead of starting a local one.")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=float, help="Ray CPUs per replica.")
@click.option("--gpus-per-replica", default=None, type=float,
              help="Ray GPUs per replica (default: 1 for cuda bundles).")
@click.option("--max-ongoing-requests", default=256, show_default=True, type=int,
              help="Requests Ray hands one replica at once; the rest wait at the proxy.")
@click.option("--api-key", default=None, envvar="ARLE_API_KEY",
              help="Require 'Authorization: Bearer KEY' (also from $ARLE_API_KEY).")
@click.option("--max-batch", default=None, type=int, help="Most requests running at once per replica.")
@click.option("--max-queue", default=1024, show_default=True, type=int, help="Most requests waiting per replica.")
@click.option("--timeout", "request_timeout", default=600.0, show_default=True, type=float,
              help="Seconds a request may take before it is cancelled.")
@click.option("--kv-pages", default=None, type=int, help=KV_PAGES_HELP)
@click.option("--max-batched-tokens", default=None, type=int, help="Tokens fed per engine step (see serve).")
@click.option("--no-verify", is_flag=True, help="Skip sha256 checks of the bundle files at load.")
def serve_ray(bundle, replicas, host, port, address, cpus_per_replica, gpus_per_replica, max_ongoing_requests, api_key,
              max_batch, max_queue, request_timeout, kv_pages, max_batched_tokens, no_verify):
    """Serve BUNDLE from several replicas behind one endpoint, on Ray Serve (docs/scale-out.md)."""
    from .ray_serve import ReplicaOptions, serve_ray as run_replicas

    threads = os.environ.get("ARLE_THREADS", "")  # passed on to every replica when set
    options = ReplicaOptions(
        bundle=bundle, replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
        max_ongoing_requests=max_ongoing_requests, api_key=api_key, request_timeout=request_timeout,
        max_batch=max_batch, max_queue=max_queue, kv_pages=kv_pages, max_batched_tokens=max_batched_tokens,
        verify=not no_verify, threads=int(threads) if threads.isdigit() else None)
    run_replicas(options, host, port, address=address, echo=lambda line: click.echo(line, err=True))


from .train.cli import data as data_group, train as train_group  # noqa: E402
cli.add_command(train_group)
cli.add_command(data_group)

main = guarded(cli, "arle-runtime")
