"""CUDA target: AOTInductor packages for NVIDIA GPUs, with a generated paged-attention kernel.

Two programs, both compiled at build time on the GPU they are for (Inductor tunes and
compiles Triton kernels for that card; the .pt2 holds the cubins):

- prefill: the step contract of arle_models.layers over a dense past (chunked prefill;
  the runtime gathers the sequence's past pages), attention by the Triton kernel rendered
  from templates/prefill_attention.py.j2 (flash attention over [past | new] with per-row
  past lengths; ARLEC_PREFILL_ATTENTION picks SDPA instead).
- decode_paged: one token per sequence reading the past straight from the paged KV pool
  through the page table, with the Triton kernel rendered from
  templates/paged_decode_attention.py.j2 for this model's head dim, GQA ratio, page size
  and KV dtype (torch.library.triton_op, so AOTInductor compiles it into the package).
  Its batch dimension is dynamic; the runtime captures one CUDA graph per decode bucket.
  With ARLEC_TUNE_DECODE=1, its projections run the skinny matmul of
  templates/skinny_matmul.py.j2 where timing on this GPU at build (decode_tuning.py) found
  it faster than cuBLAS, and the attention kernel splits each sequence's past over as
  many programs as that timing chose.
- decode_fused (batch 1..16, dense bf16/fp16/fp8 models): the same step as five
  generated kernels per layer (templates/fused_decode.py.j2: norm folded into the
  projections, SiLU and residual adds in their epilogues, q/k norm and RoPE inside the
  attention kernel), for the small batches where kernel count, not bytes, sets the
  time. The runtime times both programs' graphs per bucket at load and runs the faster.

`--quant int8` (weight-only, one scale per output channel) multiplies through the kernel
rendered from templates/int8_matmul.py.j2 in prefill and decode_paged, and through the
fused kernels (which widen int8 weights as they load them) in decode_fused.

Weights stay outside the packages (the runtime loads the bundle's safetensors onto the GPU
and hands them to the programs), so a load compiles nothing.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from arle_models import CausalLM
from arle_models.layers import PagedDecodeStep
from arle_models.moe import Experts, Qwen3MoeBlock
from arle_models.quant_layers import Int8CudaLinear
from arle_runtime.errors import ArleError

from .base import Lowered, ShapePlan
from .cpu import export_dim, export_step, program_ranges
from .kernels import (
    FusedDecodeSpec, FusedMoeSpec, Int8MatmulSpec, PagedDecodeSpec, PrefillAttentionSpec, load_kernel_module,
    render_fused_decode, render_fused_moe, render_int8_matmul, render_paged_decode, render_prefill_attention,
)
from .decode_tuning import projection_shapes, render_skinny, swap_in, swap_out, tune, tune_attention_splits

SUPPORTED_QUANTS = ("bf16", "fp16", "fp8", "int8", "int4")
PAGE_SIZE = 16
MAX_POOL_SLOTS = 1 << 26  # the pool's slot dim is dynamic; 64M positions is far past any card
# "1": time the generated decode variants on this GPU at build and keep the faster ones
# ("force": keep the generated variants even where slower, to test that path).
# Off by default: on the one GPU measured (H100, docs/perf/cuda-decode-tuning-h100.json)
# cuBLAS and the unsplit attention kernel won every comparison, and the tuned variants
# have not been compiled into a full program there yet.
TUNE_ENV = "ARLEC_TUNE_DECODE"
# "0" builds no decode_fused program (for comparisons; the runtime can also ignore one).
FUSED_ENV = "ARLEC_FUSED_DECODE"
# The prefill program's attention. "kernel" (default): templates/prefill_attention.py.j2,
# rendered for the model's shape; "gqa": SDPA with enable_gqa and the step's mask, which
# CUDA runs on SDPA's fp32 math path; "expanded": SDPA over K/V repeated per query head, so
# its memory-efficient kernel takes the mask. On an H100 (2-layer Qwen3-0.6B bundles,
# docs/perf/cuda-h100-prefill-attention.json) a 8 x 128 prefill call took 0.347 ms of GPU
# time with the kernel, 0.454 expanded, 0.573 gqa; one layer's attention at 64 x 128,
# 0.068 ms against 0.223 and 0.957.
PREFILL_ATTENTION_ENV = "ARLEC_PREFILL_ATTENTION"
PREFILL_ATTENTION_CHOICES = ("kernel", "gqa", "expanded")
DEFAULT_PREFILL_ATTENTION = "kernel"
# The fused kernels multiply 16 rows per program (tl.dot's minimum), so up to 16 they read
# each weight once; above that cuBLAS's tiles win and decode_paged serves the batch.
FUSED_MAX_BATCH = 16


def set_int8_kernel(linears, kernel) -> None:
    """The int8 matmul op for the program being exported (None: the plain-torch product)."""
    for linear in linears:
        linear.kernel = kernel


def set_moe_kernel(blocks, kernel) -> None:
    """The fused MoE kernel for the program being exported (None puts the torch path back)."""
    for block in blocks:
        if kernel is not None and not isinstance(block.experts, Experts):
            raise ArleError("The cuda target runs mixture-of-experts models with float (bf16/fp16) expert "
                            "weights; build this model with --quant bf16.")
        block.kernel = kernel


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise ArleError(
            "The cuda target compiles its kernels for the GPU it builds on, and this machine has no CUDA GPU; "
            "run `arlec build --target cuda` on the machine (or the same GPU model) that will serve."
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise ArleError(f"The cuda target needs compute capability 8.0 or newer (bf16); this GPU is {major}.{minor}.")
    return torch.device("cuda", torch.cuda.current_device())


def pool_dtype(model: CausalLM, plan: ShapePlan) -> torch.dtype:
    return model.compute_dtype if plan.kv_dtype == "auto" else getattr(torch, plan.kv_dtype)


def page_table_width(max_context: int) -> int:
    return -(-max_context // PAGE_SIZE)


def paged_example_inputs(model: CausalLM, plan: ShapePlan, device):
    cfg = model.config
    batch, pages = 2, 3
    slots = pages * PAGE_SIZE + 2
    layers = len(cfg.full_attention_layers)  # a hybrid model's linear layers keep no K/V
    pool = torch.zeros(layers, slots, cfg.num_kv_heads, cfg.head_dim, dtype=pool_dtype(model, plan), device=device)
    table = torch.zeros(batch, page_table_width(plan.max_context), dtype=torch.int32, device=device)
    table[0, :2] = torch.tensor([0, 2])
    table[1, 0] = 1
    return (
        torch.zeros(batch, 1, dtype=torch.long, device=device),
        torch.tensor([[20], [5]], dtype=torch.long, device=device),
        pool,
        pool.clone(),
        table,
        torch.tensor([20, 5], dtype=torch.int32, device=device),
        *(t.to(device) for t in model.empty_state(batch)),  # a hybrid model's linear state rows
    )


def export_paged_decode(model: CausalLM, plan: ShapePlan, device, ops=None) -> torch.export.ExportedProgram:
    """The paged decode step; with `ops` (a FusedOps) the fused small-batch step."""
    batch = export_dim("batch", 1, plan.max_batch, 2)  # paged_example_inputs has 2 rows
    slots = Dim("slots", min=2, max=MAX_POOL_SLOTS)
    args = paged_example_inputs(model, plan, device)
    state = tuple({1: batch} for _ in args[6:])  # [Llin, B, ...], the step's *state argument
    dynamic = ({0: batch}, {0: batch}, {1: slots}, {1: slots}, {0: batch}, {0: batch}) + ((state,) if state else ())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(PagedDecodeStep(model, ops), args, dynamic_shapes=dynamic, strict=False)


def prefill_attention_backends():
    """SDPA backends the prefill program may bake in: not cuDNN's. Its attention builds an
    execution plan for every new input shape, and a prefill call's shape (rows, chunk,
    past) changes nearly every step: measured on an H100, ~50 ms on each shape's first call
    against 3 ms warm, the package load took 4.5 s (cuDNN's libraries) and a 64-prompt
    burst ran 60 ms prefill steps (docs/perf/cuda-h200.md). Flash and memory-efficient
    attention have no per-shape setup."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def prefill_attention_choice() -> str:
    attention = os.environ.get(PREFILL_ATTENTION_ENV, DEFAULT_PREFILL_ATTENTION)
    if attention not in PREFILL_ATTENTION_CHOICES:
        raise ArleError(f"{PREFILL_ATTENTION_ENV} must be one of {', '.join(PREFILL_ATTENTION_CHOICES)}, got {attention!r}.")
    return attention


def compile_package(exported, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(path), inductor_configs={"aot_inductor.package_constants_in_so": False}
        )


class CudaTarget:
    name = "cuda"
    supports_hybrid = True  # Qwen3.5: the linear layers' state rows go in and out of the decode graphs
    # A --max-batch 1 Qwen3-MoE bundle built, then failed its first decode graph capture on an
    # H100 with a device-side index assert (2026-12-07, not yet understood): refused until
    # a GPU run shows batch-1 builds work.
    min_max_batch = 2

    @property
    def device(self) -> torch.device:
        return require_gpu()

    def check(self, quant_scheme: str) -> None:
        if quant_scheme not in SUPPORTED_QUANTS:
            raise ArleError(
                f"The cuda target does not support --quant {quant_scheme} yet; choose one of {', '.join(SUPPORTED_QUANTS)}."
            )
        prefill_attention_choice()  # a bad value fails before the model loads
        device = require_gpu()
        if quant_scheme == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ArleError("--quant fp8 needs fp8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
                            "use bf16 or int4 on this GPU.")

    def lower(self, model: CausalLM, plan: ShapePlan, out_dir: Path, progress) -> Lowered:
        device = require_gpu()
        cfg = model.config
        (out_dir / "cuda").mkdir(parents=True, exist_ok=True)
        (out_dir / "kernels").mkdir(exist_ok=True)
        progress("render kernels")
        spec = PagedDecodeSpec(
            head_dim=cfg.head_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            page_size=PAGE_SIZE, kv_dtype=str(pool_dtype(model, plan)).removeprefix("torch."),
        )
        mode = os.environ.get(TUNE_ENV, "0")
        tuned, force = mode in ("1", "force"), mode == "force"
        batches = tuple(sorted({1, plan.max_batch}))
        attention_tuning = None
        if tuned:
            progress("tune decode kernels on this GPU")
            splits, attention_tuning = tune_attention_splits(
                spec, batches, plan.max_context, len(cfg.full_attention_layers), model.compute_dtype,
                pool_dtype(model, plan), device, force
            )
            spec = dataclasses.replace(spec, splits=splits)
        kernel_path = out_dir / "kernels" / "paged_decode_attention.py"
        kernel_path.write_text(render_paged_decode(spec))
        kernel = load_kernel_module(kernel_path)
        files = [kernel_path]
        skinny_path = out_dir / "kernels" / "skinny_matmul.py"
        shapes = projection_shapes(model) if tuned else []
        tuning = tune(shapes, batches, model.compute_dtype, device, force) if shapes else None
        skinny = None
        if tuning and tuning.configs:
            skinny_path.write_text(render_skinny(sorted(tuning.configs.items())))
            files.append(skinny_path)
            skinny = load_kernel_module(skinny_path).skinny_linear

        int8_linears = [m for m in model.modules() if isinstance(m, Int8CudaLinear)]
        int8 = None
        if int8_linears:
            int8_path = out_dir / "kernels" / "int8_matmul.py"
            int8_path.write_text(render_int8_matmul(Int8MatmulSpec(
                num_sms=torch.cuda.get_device_properties(device).multi_processor_count)))
            files.append(int8_path)
            int8 = load_kernel_module(int8_path)

        moe_blocks = [layer.mlp for layer in model.layers if isinstance(layer.mlp, Qwen3MoeBlock)]
        moe = None
        if moe_blocks:
            moe_path = out_dir / "kernels" / "fused_moe.py"
            moe_path.write_text(render_fused_moe(FusedMoeSpec(
                hidden=cfg.hidden_size, intermediate=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
                top_k=cfg.num_experts_per_tok)))
            files.append(moe_path)
            moe = load_kernel_module(moe_path)

        progress("export + compile prefill (AOTInductor)")
        model.use_split_attention(False)
        set_moe_kernel(moe_blocks, moe and moe.prefill_moe)
        set_int8_kernel(int8_linears, int8 and int8.int8_linear_prefill)
        attention = prefill_attention_choice()
        if attention == "kernel":
            prefill_path = out_dir / "kernels" / "prefill_attention.py"
            prefill_path.write_text(render_prefill_attention(PrefillAttentionSpec(
                head_dim=cfg.head_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                kv_dtype=str(model.compute_dtype).removeprefix("torch."))))
            files.append(prefill_path)
            model.use_prefill_kernel(load_kernel_module(prefill_path).prefill_attention)
        model.use_expanded_kv(attention == "expanded")
        try:
            with prefill_attention_backends():
                compile_package(export_step(model, plan, prefill=True, device=device), out_dir / "cuda" / "prefill.pt2")
        finally:
            set_moe_kernel(moe_blocks, None)
            set_int8_kernel(int8_linears, None)
            model.use_expanded_kv(False)
            model.use_prefill_kernel(None)
        progress("export + compile paged decode (AOTInductor)")
        saved = model.paged_attention
        model.paged_attention = kernel.paged_decode_attention
        swapped = swap_in(model, tuning.configs, skinny) if skinny else []  # prefill keeps cuBLAS: many rows
        set_moe_kernel(moe_blocks, moe and moe.decode_moe)
        set_int8_kernel(int8_linears, int8 and int8.int8_linear_decode)
        try:
            compile_package(export_paged_decode(model, plan, device), out_dir / "cuda" / "decode_paged.pt2")
        finally:
            model.paged_attention = saved
            swap_out(swapped)
            set_moe_kernel(moe_blocks, None)
            set_int8_kernel(int8_linears, None)

        fused = self.lower_fused(model, plan, out_dir, progress, device)

        programs = {
            "prefill": {"path": "cuda/prefill.pt2", "format": "aoti", **program_ranges(plan, True),
                        "attention": attention,
                        "kernels": (["kernels/prefill_attention.py"] if attention == "kernel" else [])
                        + (["kernels/int8_matmul.py"] if int8 else [])},
            "decode_paged": {
                "path": "cuda/decode_paged.pt2",
                "format": "aoti",
                **program_ranges(plan, False),
                "constant_prefix": "model.",  # exported through PagedDecodeStep, which holds the model as .model
                "page_size": PAGE_SIZE,
                "page_table_width": page_table_width(plan.max_context),
                "kernels": [str(f.relative_to(out_dir)) for f in files],
                "kernel_spec": spec.variables(),
                # per projection shape: cuBLAS or the generated kernel, with the build GPU's timings
                "projection_matmuls": tuning.report if tuning else {},
                "attention_splits": attention_tuning,
            },
        }
        if isinstance(fused, dict):
            programs["decode_fused"] = fused
            files += [out_dir / fused["kernels"][0], out_dir / fused["path"]]
        else:
            programs["decode_paged"]["fused_decode"] = f"not built: {fused}"
        props = torch.cuda.get_device_properties(device)
        import triton

        requirements = {
            "torch": torch.__version__.split("+")[0],
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "device_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "machine": platform.machine(),
            "system": platform.system().lower(),
        }
        files += [out_dir / "cuda" / "prefill.pt2", out_dir / "cuda" / "decode_paged.pt2"]
        return Lowered(executor="aoti-cuda", programs=programs, requirements=requirements, files=files)

    def lower_fused(self, model: CausalLM, plan: ShapePlan, out_dir: Path, progress, device) -> dict | str:
        """Compile decode_fused (arle_models.fused_decode) and return its manifest entry,
        or say why this model gets none."""
        from arle_models.fused_decode import fusable

        if os.environ.get(FUSED_ENV, "1") == "0":
            return f"{FUSED_ENV}=0"
        reason = fusable(model)
        if reason is None and model.config.head_dim < 32:
            reason = f"head dim {model.config.head_dim} (the kernels need 32 or more)"
        if reason:
            return reason
        cfg = model.config
        spec = FusedDecodeSpec(
            head_dim=cfg.head_dim, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, page_size=PAGE_SIZE,
            kv_dtype=str(pool_dtype(model, plan)).removeprefix("torch."),
            qk_norm=model.layers[0].self_attn.q_norm is not None,
            num_sms=torch.cuda.get_device_properties(device).multi_processor_count,
        )
        path = out_dir / "kernels" / "fused_decode.py"
        path.write_text(render_fused_decode(spec))
        ops = load_kernel_module(path).OPS
        small = dataclasses.replace(plan, max_batch=min(plan.max_batch, FUSED_MAX_BATCH))
        progress("export + compile fused small-batch decode (AOTInductor)")
        try:
            compile_package(export_paged_decode(model, small, device, ops), out_dir / "cuda" / "decode_fused.pt2")
        except Exception as e:  # noqa: BLE001 - an optional program: the bundle stays whole without it, and says so
            warnings.warn(f"decode_fused was not built ({type(e).__name__}: {e}); decode_paged serves every batch")
            (out_dir / "cuda" / "decode_fused.pt2").unlink(missing_ok=True)
            path.unlink()
            return f"compile failed: {type(e).__name__}: {compile_error_lines(str(e))}"
        return {
            "path": "cuda/decode_fused.pt2",
            "format": "aoti",
            **program_ranges(small, False),
            "constant_prefix": "model.",
            "page_size": PAGE_SIZE,
            "page_table_width": page_table_width(plan.max_context),
            "kernels": [str(path.relative_to(out_dir))],
            "kernel_spec": {k: v for k, v in spec.variables().items() if k != "configs"},
        }


def compile_error_lines(message: str, limit: int = 1500) -> str:
    """The part of a compile error worth keeping: a C++ compile error starts with the long
    compiler command, so keep the compiler's own `error:` lines (and the line after each)."""
    lines = message.splitlines()
    picked = [line for i, line in enumerate(lines) if "error:" in line or i and "error:" in lines[i - 1]]
    return ("\n".join(picked) if picked else message)[:limit]
