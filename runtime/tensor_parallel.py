"""Tensor-parallel bundles: one process per rank, the engine on rank 0.

A bundle built with `arlec build --tp N` holds N weight shards and programs whose
all-reduces / all-gathers (torch's functional collectives, compiled in) run over the
default process group. To serve it, rank 0 (the process that loaded the bundle) starts
N - 1 worker processes of this module, forms the group with them (NCCL on GPUs, gloo on
CPU) plus a gloo side group for control messages, and runs the engine as usual. The
only difference is the model runner (`TensorParallelRunner`): before each step it
broadcasts the step's plan (KV page copies, decode rows, prefill chunks) as one flat
int64 tensor; every worker runs the same plan through its own ModelRunner over its
own KV pool (its share of the KV heads). The programs' collectives then meet, and
every rank ends the step with the full logits; only rank 0 samples.

CUDA graphs: each rank captures its decode buckets when its runner binds its pool, in
the same order on every rank, so the NCCL calls inside the graphs pair up on replay.

Workers end when rank 0 says stop (at its exit), and by themselves when rank 0's
process disappears (a watchdog polls the parent pid): no orphans.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import logging
import os
import subprocess
import sys
import threading
import time

import torch

from .bundle import Bundle, load_bundle
from .engine.model_runner import ModelRunner
from .errors import ArleError

log = logging.getLogger("arle.tp")

# Keep NVLink multicast off in every process we start (device README: it can take a
# shared host's GPUs out of service); a user's own setting is kept.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STARTUP_TIMEOUT_S = float(os.environ.get("ARLE_TP_STARTUP_TIMEOUT", "600"))
CONTROL_TIMEOUT = datetime.timedelta(hours=1)  # loading shards may take minutes; idle time is covered by pings

OP_SETUP, OP_STEP, OP_STOP, OP_PING = 1, 2, 3, 4
# An idle server still broadcasts this often: a worker waiting for the next step must
# not run into the control group's timeout.
PING_S = 30.0


def tp_size(manifest: dict) -> int:
    return int(manifest.get("tensor_parallel", {}).get("size", 1))


def set_nccl_env(env: dict | None = None) -> dict:
    env = os.environ if env is None else env
    for key, value in NCCL_ENV.items():
        env.setdefault(key, value)
    return env


# --- process groups ----------------------------------------------------------------------


def _rank_command(role: str, port: int, rank: int, world: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "arle_runtime.tensor_parallel", role, str(port), str(rank), str(world), *extra]


def _spawn(role: str, port: int, world: int, extra: list[str], env_extra: dict | None = None) -> list[subprocess.Popen]:
    env = set_nccl_env(dict(os.environ))
    env["ARLE_TP_PARENT"] = str(os.getpid())
    env.update(env_extra or {})
    return [subprocess.Popen(_rank_command(role, port, r, world, extra), env=env) for r in range(1, world)]


def _master_store(world: int):
    import torch.distributed as dist

    # Port 0: the OS picks a free port, read back from the store (no race for a port).
    return dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))


def _await_workers(store, workers: list[subprocess.Popen]) -> None:
    """Wait until every worker has reached the store, failing at once if one has exited
    (init_process_group would otherwise wait out its whole timeout)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    keys = [f"arle/up/{r}" for r in range(1, len(workers) + 1)]
    while not store.check(keys):
        for rank, p in enumerate(workers, start=1):
            if p.poll() is not None:
                raise ArleError(f"Tensor-parallel rank {rank} exited at start (code {p.returncode}); "
                                "its message is above.")
        if time.monotonic() > deadline:
            raise ArleError(f"Tensor-parallel workers did not start within {STARTUP_TIMEOUT_S:.0f} s.")
        time.sleep(0.05)


def _init_group(backend: str, store, rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))


@contextlib.contextmanager
def compile_group(world: int, group: str = "0"):
    """A gloo process group of `world` ranks named `group`, with this process as rank 0
    and idle helper processes as the rest: Inductor looks the group of each compiled
    collective up by name (for its size) while compiling, but runs none of them.
    gloo even for CUDA builds: no GPU per rank is needed, and no NCCL call can run."""
    import torch.distributed as dist

    if world == 1:
        yield
        return
    if dist.is_initialized():
        raise ArleError("A tensor-parallel build needs its own process group; this process already has one.")
    store = _master_store(world)
    helpers = _spawn("compile-helper", store.port, world, [])
    try:
        _await_workers(store, helpers)
        _init_group("gloo", store, 0, world)
        if dist.group.WORLD.group_name != group:
            raise ArleError(f"The build's process group is named {dist.group.WORLD.group_name!r}, not {group!r}.")
        yield
    finally:
        store.set("arle/done", "1")
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in helpers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


# --- the step plan on the wire --------------------------------------------------------


def encode_plan(plan, page_size: int) -> torch.Tensor:
    """[n_copies, n_decodes, n_prefills, copies (src, dst)..., decodes (position, token,
    n_pages, pages...)..., prefills (start, length, n_pages, tokens..., pages...)...]"""
    out = [len(plan.copies), len(plan.decodes), len(plan.prefills)]
    for c in plan.copies:
        out += [c.src, c.dst]
    for seq in plan.decodes:
        p = seq.num_tokens - 1
        pages = seq.page_table[: p // page_size + 1]
        out += [p, seq.last_token, len(pages), *pages]
    for chunk in plan.prefills:
        pages = chunk.seq.page_table[: -(-(chunk.start + chunk.length) // page_size)]
        out += [chunk.start, chunk.length, len(pages), *chunk.token_ids, *pages]
    return torch.tensor(out, dtype=torch.long)


class _RemoteSeq:
    """What a ModelRunner reads of a Sequence, rebuilt on a worker."""

    def __init__(self, seq_id: int, page_table: list[int], num_tokens: int, token_ids: list[int]):
        self.seq_id, self.page_table, self.num_tokens, self._tokens = seq_id, page_table, num_tokens, token_ids

    @property
    def last_token(self) -> int:
        return self._tokens[-1]


class _RemoteChunk:
    def __init__(self, seq: _RemoteSeq, start: int, length: int, token_ids: list[int]):
        self.seq, self.start, self.length, self.token_ids = seq, start, length, token_ids
        self.samples = False  # workers do not sample


class _RemotePlan:
    def __init__(self, copies, decodes, prefills):
        self.copies, self.decodes, self.prefills, self.sampling = copies, decodes, prefills, []


def decode_plan(values: list[int]) -> _RemotePlan:
    from .engine.kv_pages import PageCopy

    n_copies, n_decodes, n_prefills = values[:3]
    i = 3
    copies = []
    for _ in range(n_copies):
        copies.append(PageCopy(values[i], values[i + 1]))
        i += 2
    decodes = []
    for k in range(n_decodes):
        p, token, n = values[i : i + 3]
        decodes.append(_RemoteSeq(k, values[i + 3 : i + 3 + n], p + 1, [token]))
        i += 3 + n
    prefills = []
    for k in range(n_prefills):
        start, length, n = values[i : i + 3]
        tokens = values[i + 3 : i + 3 + length]
        pages = values[i + 3 + length : i + 3 + length + n]
        seq = _RemoteSeq(n_decodes + k, pages, start + length, tokens)
        prefills.append(_RemoteChunk(seq, start, length, tokens))
        i += 3 + length + n
    return _RemotePlan(copies, decodes, prefills)


class ControlChannel:
    """Rank 0 -> all: (op, payload) as two gloo broadcasts on a side group (a fixed
    2-int header, then the int64 payload); no pickling."""

    def __init__(self, group):
        self.group = group
        self._lock = threading.Lock()
        self.last_sent = time.monotonic()

    def send(self, op: int, payload: torch.Tensor | None = None) -> None:
        import torch.distributed as dist

        payload = torch.empty(0, dtype=torch.long) if payload is None else payload
        with self._lock:
            dist.broadcast(torch.tensor([op, payload.numel()], dtype=torch.long), 0, group=self.group)
            if payload.numel():
                dist.broadcast(payload, 0, group=self.group)
            self.last_sent = time.monotonic()

    def recv(self) -> tuple[int, torch.Tensor]:
        import torch.distributed as dist

        header = torch.empty(2, dtype=torch.long)
        dist.broadcast(header, 0, group=self.group)
        op, n = header.tolist()
        payload = torch.empty(n, dtype=torch.long)
        if n:
            dist.broadcast(payload, 0, group=self.group)
        return op, payload


# --- per-rank bundles and executors ------------------------------------------------------


def rank_bundle(bundle: Bundle, rank: int) -> Bundle:
    """The bundle as rank `rank` sees it: its weight shard, its share of the heads."""
    from arle_models.parallel import per_rank_config

    tp = bundle.manifest["tensor_parallel"]
    manifest = copy.deepcopy(bundle.manifest)
    manifest["weights"] = {**manifest["weights"], "path": tp["weights"][rank]}
    config = per_rank_config(bundle.config, tp["size"])
    manifest["model"]["config"] = config.to_dict()
    manifest["kv_cache"]["num_kv_heads"] = config.num_kv_heads
    manifest["tensor_parallel"]["rank"] = rank  # load_executor: this shard's own executor, no launch
    return Bundle(bundle.root, manifest)


def local_executor(bundle: Bundle, rank: int):
    from .executor import load_executor

    return load_executor(rank_bundle(bundle, rank))


class TensorParallelExecutor:
    """Rank 0's executor: rank 0's own shard executor, plus the workers and the channel.

    The engine drives it like any executor; its `runner_class` makes the engine's
    model runner broadcast each step. Direct prefill/decode calls outside an engine
    step would leave the workers out of the collectives (and hang), so they are refused.
    """

    def __init__(self, local, channel: ControlChannel, workers: list[subprocess.Popen], world: int):
        self.local, self.channel, self.workers, self.world = local, channel, workers, world
        self.limits, self.kv_dtype, self.device = local.limits, local.kv_dtype, local.device
        self.paged = getattr(local, "paged", False)
        self.in_step = False
        self._closed = False
        atexit.register(self.close)
        threading.Thread(target=self._keepalive, daemon=True, name="arle-tp-keepalive").start()

    def _keepalive(self) -> None:
        while not self._closed:
            time.sleep(1.0)
            if time.monotonic() - self.channel.last_sent > PING_S and not self._closed:
                try:
                    self.channel.send(OP_PING)
                except Exception:  # noqa: BLE001 - a dead worker; the next step reports it
                    return

    @property
    def runner_class(self):
        return TensorParallelRunner

    def cache_shape(self, batch: int, length: int):
        return self.local.cache_shape(batch, length)

    def _check(self):
        if not self.in_step:
            raise ArleError(
                "A tensor-parallel bundle runs only through the engine (arle-runtime run / serve); "
                "this tool calls the model directly, which needs all ranks."
            )
        dead = [p.pid for p in self.workers if p.poll() is not None]
        if dead:
            raise ArleError(f"A tensor-parallel worker process ({dead[0]}) has exited; restart the server.")

    def prefill(self, *args):
        self._check()
        return self.local.prefill(*args)

    def decode(self, *args):
        self._check()
        return self.local.decode(*args)

    def decode_paged(self, *args):
        self._check()
        return self.local.decode_paged(*args)

    def bind_kv_pool(self, *args):
        self.local.bind_kv_pool(*args)

    def __getattr__(self, name):  # graph_capture_s, decode_buckets, ... of the local executor
        return getattr(self.__dict__["local"], name)

    def close(self) -> None:
        """Tell the workers to stop and wait for them (at exit; also safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        import torch.distributed as dist

        with contextlib.suppress(Exception):
            if all(p.poll() is None for p in self.workers):
                self.channel.send(OP_STOP)
        deadline = time.monotonic() + 10
        for p in self.workers:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner: tells the workers the pool size once, then each step's plan."""

    def __init__(self, executor: TensorParallelExecutor, pages):
        executor.channel.send(OP_SETUP, torch.tensor([pages.num_pages, pages.page_size], dtype=torch.long))
        super().__init__(executor, pages)

    def run(self, plan):
        ex = self.executor
        ex.channel.send(OP_STEP, encode_plan(plan, self.pages.page_size))
        ex.in_step = True
        try:
            return super().run(plan)
        finally:
            ex.in_step = False


def _backend(bundle: Bundle) -> str:
    return "nccl" if bundle.target == "cuda" else "gloo"


def check_devices(bundle: Bundle, world: int) -> None:
    if bundle.target == "cuda":
        have = torch.cuda.device_count()
        if have < world:
            raise ArleError(f"Bundle {bundle.root} is split over {world} GPUs (tensor parallel), but this machine "
                            f"shows {have}; run it where {world} GPUs are visible, or rebuild with a smaller --tp.")


def launch(bundle: Bundle) -> TensorParallelExecutor:
    """Start the workers, form the groups, load rank 0's shard (called by load_executor)."""
    import torch.distributed as dist

    world = tp_size(bundle.manifest)
    check_devices(bundle, world)
    if dist.is_initialized():
        raise ArleError("This process already belongs to a process group; a tensor-parallel bundle needs its own.")
    set_nccl_env()
    store = _master_store(world)
    extra = [str(bundle.root)]
    workers = _spawn("worker", store.port, world, extra)
    try:
        _await_workers(store, workers)
        _init_group(_backend(bundle), store, 0, world)
        expected = bundle.manifest["tensor_parallel"].get("group", "0")
        if dist.group.WORLD.group_name != expected:
            raise ArleError(f"The process group is named {dist.group.WORLD.group_name!r}; this bundle's programs "
                            f"expect {expected!r}.")
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        if bundle.target == "cuda":
            torch.cuda.set_device(0)
        local = local_executor(bundle, 0)
        # Every rank reports whether its shard loaded (1 = failed), so none waits forever.
        status = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(status, torch.zeros(1, dtype=torch.long), group=control)
        failed = [r for r, s in enumerate(status) if int(s)]
        if failed:
            raise ArleError(f"Tensor-parallel rank {failed[0]} could not load bundle {bundle.root} "
                            "(its message is above).")
    except BaseException:
        for p in workers:
            p.kill()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    log.info("tensor parallel: %d ranks (%s)", world, _backend(bundle))
    return TensorParallelExecutor(local, ControlChannel(control), workers, world)


# --- worker processes ------------------------------------------------------------------


def _watch_parent() -> None:
    """Exit when rank 0's process is gone (a blocked NCCL call would never notice).

    The kernel's parent-death signal does it even while this process is stuck in a
    collective with the GIL held (compiled programs hold it), where a Python thread
    cannot run; the polling thread covers a parent that is not our direct parent."""
    parent = int(os.environ.get("ARLE_TP_PARENT", os.getppid()))
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)

    def loop():
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=loop, daemon=True, name="arle-tp-watchdog").start()


def _connect(port: int, rank: int, world: int):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    store.set(f"arle/up/{rank}", "1")
    return store


def worker_main(port: int, rank: int, world: int, bundle_path: str) -> int:
    import torch.distributed as dist

    from .engine.kv_pages import PageManager

    threads = os.environ.get("ARLE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    bundle = load_bundle(bundle_path, verify=False)  # rank 0 checked the files
    if bundle.target == "cuda":
        torch.cuda.set_device(rank)
    _init_group(_backend(bundle), _connect(port, rank, world), rank, world)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    failed = 0
    try:
        executor = local_executor(bundle, rank)
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which ends the launch
        print(f"arle-runtime: tensor-parallel rank {rank}: {getattr(e, 'message', repr(e))}", file=sys.stderr)
        failed = 1
    dist.all_gather([torch.zeros(1, dtype=torch.long) for _ in range(world)],
                    torch.tensor([failed], dtype=torch.long), group=control)
    if failed:
        return 1
    channel = ControlChannel(control)
    runner = None
    with torch.no_grad():
        while True:
            op, payload = channel.recv()
            if op == OP_STOP:
                break
            if op == OP_SETUP:
                num_pages, page_size = payload.tolist()
                runner = ModelRunner(executor, PageManager(num_pages, page_size, prefix_cache=False))
            elif op == OP_STEP:
                try:
                    runner.run(decode_plan(payload.tolist()))
                except ArleError as e:
                    # Rank 0 ran the same checks on the same plan and failed the same way.
                    log.debug("rank %d: step refused: %s", rank, e.message)
    dist.destroy_process_group()
    return 0


def compile_helper_main(port: int, rank: int, world: int) -> int:
    import torch.distributed as dist

    store = _connect(port, rank, world)
    _init_group("gloo", store, rank, world)
    store.wait(["arle/done"])
    dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    from .preload import reexec_with_system_libstdcxx

    reexec_with_system_libstdcxx()
    set_nccl_env()
    _watch_parent()
    role, port, rank, world = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if role == "worker":
        return worker_main(port, rank, world, argv[4])
    if role == "compile-helper":
        return compile_helper_main(port, rank, world)
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
