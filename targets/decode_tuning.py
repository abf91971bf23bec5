"""Build-time tuning of the decode step's generated kernels, on the GPU the build runs on.

- Projections: for each distinct weight shape of the decoder layers, the kernel of
  templates/skinny_matmul.py.j2 over a small grid of block shapes and K splits against
  cuBLAS (F.linear), at batch 1 and at the largest decode batch. A shape takes the kernel
  only when its best config beats cuBLAS over those batches.
- Paged attention: how many programs split each sequence's past (flash-decoding), 1 being
  the plain kernel, at the same two batch sizes over half the context.

The choices and every timing go into the manifest; the chosen configs are rendered into
the kernel files that AOTInductor compiles into the decode program.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import PagedDecodeSpec, load_kernel_module, render_op, render_paged_decode

SKINNY_TEMPLATE = "skinny_matmul.py.j2"
BLOCK_NS = (32, 64, 128)
BLOCK_KS = (128, 256)
SPLITS = (1, 2, 4, 8, 16)
NUM_WARPS, NUM_STAGES = 4, 3
L2_FLUSH_BYTES = 128 << 20  # rotate among weight copies worth this much so timings read HBM, not L2
ATTENTION_SPLITS = (1, 2, 4, 8)


def block_ms(max_batch: int) -> tuple[int, ...]:
    """M tiles worth trying: 16 (tl.dot's smallest) and one tile holding the largest batch (at most 64)."""
    whole = min(64, max(16, 1 << (max_batch - 1).bit_length()))
    return tuple(sorted({16, whole}))


def candidate_configs(n: int, k: int, max_batch: int) -> list[tuple[int, int, int, int, int, int]]:
    """Configs that tile [N, K] exactly (the kernel has no bounds checks on N or K)."""
    configs = []
    for block_m in block_ms(max_batch):
        for block_n in BLOCK_NS:
            for block_k in BLOCK_KS:
                for split in SPLITS:
                    if n % block_n or k % (block_k * split):
                        continue
                    configs.append((block_m, block_n, block_k, split, NUM_WARPS, NUM_STAGES))
    return configs


def fastest(us: dict) -> object | None:
    """The key whose timings (batch size -> us) add up to the least, None when there are none."""
    return min(us, key=lambda key: sum(us[key].values()), default=None)


def choose(cublas_us: dict[int, float], kernel_us: dict[tuple, dict[int, float]], force: bool = False) -> tuple | None:
    """The config with the least total time over the timed batch sizes, if it beats cuBLAS's
    total (or regardless, with `force`: for tests of the kernel path)."""
    best = fastest(kernel_us)
    if best is None:
        return None
    return best if force or sum(kernel_us[best].values()) < sum(cublas_us.values()) else None


def projection_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Distinct [N, K] of the plain float linears in the decoder layers (not the LM head,
    whose one large matrix cuBLAS already reads near full bandwidth)."""
    shapes = {
        tuple(m.weight.shape) for m in model.layers.modules()
        if type(m) is nn.Linear and m.weight.dtype in (torch.bfloat16, torch.float16)
    }
    return sorted(shapes)


def _probe_dir() -> Path:
    """Where candidate kernels are written while tuning: outside the bundle, and kept until
    the process exits, because Inductor reads a kernel's source from its file when it
    compiles the program (and a probe can be the very module the program ends up using)."""
    path = Path(tempfile.mkdtemp(prefix="arle-tune-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _time_us(fn, calls: int, replays: int = 8, repeats: int = 5) -> float:
    """Microseconds per call of `fn`'s `calls` launches, replayed from one CUDA graph: in
    the decode program they run inside a graph too, so eager launch cost would mislead."""
    fn()  # compiles the kernel on first use; nothing may compile during capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return 1000 * sorted(times)[len(times) // 2] / calls


@dataclass
class Tuning:
    configs: dict[tuple[int, int], tuple]  # shape -> chosen config (shapes left to cuBLAS absent)
    report: dict  # for the manifest: per shape, cuBLAS and best-kernel microseconds per batch size


def tune(shapes, batches: tuple[int, ...], dtype: torch.dtype, device, force: bool = False) -> Tuning:
    """Time every candidate for every shape on this GPU and keep what wins."""
    from triton.runtime.errors import OutOfResources

    probe = _probe_dir() / "skinny_matmul_tuning.py"
    probe.write_text(render_skinny([]))
    module = load_kernel_module(probe)
    chosen, report = {}, {}
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k * dtype.itemsize)))
        weights = [torch.randn(n, k, device=device, dtype=dtype, generator=gen) / math.sqrt(k) for _ in range(copies)]
        cublas, kernel, unfit = {}, {}, set()
        candidates = candidate_configs(n, k, max(batches))
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
            cublas[m] = _time_us(lambda: [F.linear(x, w) for w in weights], copies)
            for config in candidates:
                if config in unfit:
                    continue
                try:
                    kernel.setdefault(config, {})[m] = _time_us(
                        lambda: [module.skinny_matmul(x, w, config, traced=False) for w in weights],
                        copies,
                    )
                except OutOfResources:  # tiles too large for this GPU's shared memory
                    unfit.add(config)
                    kernel.pop(config, None)
        config, best = choose(cublas, kernel, force), fastest(kernel)
        report[f"{n}x{k}"] = {
            "choice": "kernel" if config else "cublas",
            "config": list(best) if best else None,
            "cublas_us": {str(m): round(t, 2) for m, t in cublas.items()},
            "kernel_us": {str(m): round(t, 2) for m, t in kernel[best].items()} if best else None,
        }
        if config:
            chosen[(n, k)] = config
    return Tuning(chosen, report)


def render_skinny(configs) -> str:
    """Kernel source with these (shape, config) pairs."""
    items = [(repr(tuple(shape)), repr(tuple(config))) for shape, config in configs]
    return render_op(SKINNY_TEMPLATE, {"configs": items}, "skinny_linear")


class SkinnyLinear(nn.Module):
    """Stands in for a tuned nn.Linear while the decode step is exported: the same weight
    and bias tensors (so the program's constant names do not change), the generated op."""

    def __init__(self, linear: nn.Linear, op):
        super().__init__()
        self.weight, self.bias, self.op = linear.weight, linear.bias, op
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.op(x.reshape(-1, x.shape[-1]), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def swap_in(model: nn.Module, configs: dict, op) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Replace the decoder layers' tuned linears by SkinnyLinear; returns what to put back."""
    swapped = []
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and tuple(child.weight.shape) in configs:
                setattr(parent, name, SkinnyLinear(child, op))
                swapped.append((parent, name, child))
    return swapped


def swap_out(swapped) -> None:
    for parent, name, child in swapped:
        setattr(parent, name, child)


def tune_attention_splits(spec: PagedDecodeSpec, batches: tuple[int, ...], max_context: int, layers: int,
                          dtype: torch.dtype, pool_dtype: torch.dtype, device, force: bool = False) -> tuple[int, dict]:
    """Split count with the least total time over `batches`, each sequence holding half the
    context (at most 1024 positions), every layer's pool distinct as in a real step (with
    `force`, the fastest split count above one: for tests of the split path)."""
    past = max(1, min(max_context, 2048) // 2)
    page = spec.page_size
    pages = -(-(past + 1) // page)
    gen = torch.Generator(device=device).manual_seed(0)
    probes = _probe_dir()
    kernels = {}
    for splits in ATTENTION_SPLITS:
        probe = probes / f"paged_decode_splits{splits}.py"
        probe.write_text(render_paged_decode(dataclasses.replace(spec, splits=splits)))
        kernels[splits] = load_kernel_module(probe).paged_decode_attention
    timings: dict[int, dict[int, float]] = {}
    for batch in batches:
        slots = batch * pages * page + 2
        per_layer = 2 * slots * spec.num_kv_heads * spec.head_dim * pool_dtype.itemsize
        copies = min(layers, max(2, math.ceil(L2_FLUSH_BYTES / per_layer)))
        shape = (copies, slots, spec.num_kv_heads, spec.head_dim)
        k_pool = torch.randn(shape, device=device, generator=gen).to(pool_dtype)
        v_pool = torch.randn(shape, device=device, generator=gen).to(pool_dtype)
        table = torch.randperm(batch * pages, device=device, generator=gen).view(batch, pages).to(torch.int32)
        lens = torch.full((batch,), past, dtype=torch.int32, device=device)
        q = torch.randn(batch, spec.num_heads, spec.head_dim, device=device, dtype=dtype, generator=gen)
        k_new, v_new = (torch.randn(batch, spec.num_kv_heads, spec.head_dim, device=device, dtype=dtype, generator=gen)
                        for _ in range(2))
        for splits, kernel in kernels.items():
            timings.setdefault(splits, {})[batch] = _time_us(
                lambda: [kernel(q, k_new, v_new, k_pool[i], v_pool[i], table, lens) for i in range(copies)], copies
            )
    best = fastest({s: t for s, t in timings.items() if s > 1 or not force})
    report = {"context": past, "chosen": best,
              "us": {str(s): {str(b): round(t, 2) for b, t in per.items()} for s, per in timings.items()}}
    return best, report
