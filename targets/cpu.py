"""CPU target: prefill and decode steps exported with torch.export and compiled ahead of
time by AOTInductor into .pt2 packages (a compiled .so inside), weights kept outside the
package so the runtime mmaps them from the bundle's safetensors.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import warnings
from pathlib import Path

import torch
from torch.export import Dim

from arle_models import CausalLM
from arle_models.linear_attention import CHUNK as LINEAR_SCAN_CHUNK
from arle_runtime.errors import ArleError

from .base import Lowered, ShapePlan

SUPPORTED_QUANTS = ("fp32", "bf16", "fp16", "int8", "int4")


def example_inputs(model: CausalLM, batch: int, tokens: int, past: int, device="cpu"):
    cache = model.empty_cache(batch, past).to(device)  # [full-attention layers, B, Hkv, P, D]
    return (
        torch.zeros(batch, tokens, dtype=torch.long, device=device),
        torch.zeros(batch, tokens, dtype=torch.long, device=device),
        cache,
        cache.clone(),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
        *(s.to(device) for s in model.empty_state(batch)),  # hybrid models' linear-attention state
    )


def export_dim(name: str, low: int, high: int, example: int) -> Dim:
    """A dynamic dim for torch.export that also holds the export's example size: torch
    refuses a range of one value (`--max-batch 1`) and an example outside the range. The
    program then accepts a little more than the bundle allows; the runtime enforces the
    bundle's own limits (manifest `buckets`)."""
    return Dim(name, min=low, max=max(high, example, low + 1))


def step_dynamic_shapes(plan: ShapePlan, prefill: bool, num_state: int = 0):
    # the example sizes of export_step: 2 rows, 3 prefill tokens, a past of 5
    batch = export_dim("batch", 1, plan.max_batch, 2)
    past = export_dim("past", 0, plan.max_context - 1, 5)
    if prefill:
        tokens = export_dim("tokens", 1, plan.max_prefill_tokens, 3)
        tok = {0: batch, 1: tokens}
    else:
        tok = {0: batch}
    state = tuple({1: batch} for _ in range(num_state))  # [layers, B, ...]
    return (tok, tok, {1: batch, 3: past}, {1: batch, 3: past}, {0: batch}, {0: batch}, *state)


def program_ranges(plan: ShapePlan, prefill: bool) -> dict:
    return {
        "batch": [1, plan.max_batch],
        "tokens": [1, plan.max_prefill_tokens] if prefill else [1, 1],
        "past": [0, plan.max_context - 1],
        "context": plan.max_context,
    }


def export_step(model: CausalLM, plan: ShapePlan, prefill: bool, device="cpu") -> torch.export.ExportedProgram:
    # Example sizes above 1 keep torch.export from specializing a dynamic dim to 1.
    args = example_inputs(model, batch=2, tokens=3 if prefill else 1, past=5, device=device)
    num_state = len(model.empty_state(1))
    model.use_split_attention(not prefill)
    if num_state and prefill:
        # The linear-attention scan loops over chunks; a compiled loop needs a static count.
        # One chunk more than the longest prefill needs keeps the padding non-empty for every
        # token count: a chunk of exactly the padded length makes export specialise on it.
        model.scan_chunks = plan.max_prefill_tokens // LINEAR_SCAN_CHUNK + 1
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = step_dynamic_shapes(plan, prefill, num_state)
            return torch.export.export(model, args, dynamic_shapes=shapes, strict=False)
    finally:
        model.use_split_attention(False)
        if num_state:
            model.scan_chunks = None


@contextlib.contextmanager
def aten_fallbacks(ops):
    """Compile these ops as plain calls to their ATen kernels instead of Inductor's lowering.

    Inductor lowers _weight_int4pack_mm_for_cpu by turning the group size into a tensor
    constant it creates itself; with weights kept outside the package
    (package_constants_in_so=False) that constant would exist nowhere, and loading fails.
    The fallback calls the very same ATen kernel with the group size as an int.
    """
    from torch._inductor import lowering

    # Inductor logs a warning for each such op; the fallback is deliberate.
    logging.getLogger("torch._inductor.ir").setLevel(logging.ERROR)
    saved = {op: lowering.lowerings.pop(op, None) for op in ops}
    try:
        for op in ops:
            lowering.make_fallback(op, warn=False)
        yield
    finally:
        for op, fn in saved.items():
            lowering.lowerings.pop(op, None)
            if fn is not None:
                lowering.lowerings[op] = fn


ATEN_FALLBACKS = (torch.ops.aten._weight_int4pack_mm_for_cpu.default,)
# Inductor's own int8 matmul lowering asserts when its input is an unrealized pointwise
# result (seen on torch 2.13), which Qwen3.5's gated outputs feed straight to o_proj/out_proj.
HYBRID_ATEN_FALLBACKS = (torch.ops.aten._weight_int8pack_mm.default,)


class CpuTarget:
    name = "cpu"
    supports_hybrid = True  # steps carry the linear-attention state (arle_models.qwen3_5)

    def check(self, quant_scheme: str) -> None:
        if quant_scheme not in SUPPORTED_QUANTS:
            raise ArleError(
                f"The cpu target does not support --quant {quant_scheme}; choose one of {', '.join(SUPPORTED_QUANTS)}."
            )

    def lower(self, model: CausalLM, plan: ShapePlan, out_dir: Path, progress) -> Lowered:
        programs, files = {}, []
        (out_dir / "cpu").mkdir(parents=True, exist_ok=True)
        for name, prefill in (("prefill", True), ("decode", False)):
            progress(f"export {name}")
            exported = export_step(model, plan, prefill)
            progress(f"compile {name} (AOTInductor)")
            path = out_dir / "cpu" / f"{name}.pt2"
            fallbacks = ATEN_FALLBACKS + (HYBRID_ATEN_FALLBACKS if model.config.is_hybrid else ())
            with warnings.catch_warnings(), aten_fallbacks(fallbacks):
                warnings.simplefilter("ignore")
                torch._inductor.aoti_compile_and_package(
                    exported,
                    package_path=str(path),
                    inductor_configs={"aot_inductor.package_constants_in_so": False},
                )
            programs[name] = {"path": f"cpu/{name}.pt2", "format": "aoti", **program_ranges(plan, prefill)}
            files.append(path)
        requirements = {
            "torch": torch.__version__.split("+")[0],
            "machine": platform.machine(),
            "system": platform.system().lower(),
        }
        return Lowered(executor="aoti", programs=programs, requirements=requirements, files=files)
