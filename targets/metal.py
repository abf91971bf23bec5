"""Metal target: the prefill and decode steps lowered through Apache TVM Relax to Metal
shader source and arm64-apple-macos objects, plus the same Relax module built for `llvm`.

No Apple hardware exists where this is built and tested, so each step is compiled twice
from one imported Relax module (targets/tvm_lower.py):

  metal/<step>/lib0.o, devc.o   arm64 Mach-O objects: host code, the VM bytecode and the
                                Metal kernels (packed by TVM); the runtime links them on macOS
  metal/<step>.metal            the generated Metal shader source, for review
  llvm/<step>.so                the same module for this machine's CPU: what `arlec verify`
                                and `arle-runtime` run off a Mac, the numerical proof

The weights stay out of every artifact: the programs take them as parameters, listed by
name in the manifest, and executors pass the bundle's mmapped safetensors.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import torch

from arle_models import CausalLM
from arle_runtime.errors import ArleError

from .base import Lowered, ShapePlan
from .cpu import program_ranges
from .tvm_lower import METAL_HOST_TRIPLE, TVM_VERSION, compile_step, import_step, import_tvm

# fp16 (the Apple GPU's native float) does not import yet: torch.export gives the fp16
# step's inputs separate batch symbols, so TVM cannot prove the rotary multiply's shapes
# equal (docs/metal.md). int4 is arle_models' Int4MetalLinear (plain-op dequantization,
# computing in fp32); int8 has no such layer yet.
SUPPORTED_QUANTS = ("fp32", "int4")


def keep_objects(output: str, files: list[str]) -> None:
    """export_library's link step, replaced by copying the objects into a folder: linking a
    Mach-O dylib needs Apple's linker, which is on the Mac that runs the bundle."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, out / Path(f).name)


keep_objects.object_format = "o"


def device_sources(module, kind: str) -> list[str]:
    """Source of every imported `kind` module (Metal kernels hang under the host module)."""
    found = [module.inspect_source(kind)] if module.kind == kind else []
    for child in module.imports:
        found += device_sources(child, kind)
    return found


def kernel_names(source: str) -> list[str]:
    names = []
    for line in source.splitlines():
        if line.startswith("kernel void "):
            names.append(line.removeprefix("kernel void ").split("(")[0].strip())
    return names


class MetalTarget:
    name = "metal"

    def check(self, quant_scheme: str) -> None:
        if quant_scheme not in SUPPORTED_QUANTS:
            raise ArleError(
                f"The metal target supports only --quant fp32 or int4 for now, not {quant_scheme}; "
                f"use one of those, or --target cpu for {quant_scheme}."
            )
        import_tvm()

    def lower(self, model: CausalLM, plan: ShapePlan, out_dir: Path, progress) -> Lowered:
        programs, files = {}, []
        # int4 needs fusion (the dequantization folded into its matmul, tvm_lower.dequantize_into_matmul);
        # fp32 keeps the proven unfused pipeline (docs/metal.md). llvm gets the same passes as Metal.
        fuse = any(p.dtype == torch.uint8 for p in model.parameters())
        for name, prefill in (("prefill", True), ("decode", False)):
            progress(f"lower {name} (TVM metal)")
            mod, params = import_step(model, plan, prefill)
            metal = compile_step(mod, "metal", fuse=fuse)
            objects = out_dir / "metal" / name
            metal.export_library(str(objects), fcompile=keep_objects)
            source = "\n".join(device_sources(metal.mod, "metal"))
            kernels = kernel_names(source)
            if not kernels:
                raise ArleError(f"TVM generated no Metal kernel for the {name} step; this TVM build lacks Metal codegen.")
            (out_dir / "metal" / f"{name}.metal").write_text(source)
            progress(f"compile {name} (TVM llvm)")
            cpu = compile_step(mod, "llvm", fuse=fuse)
            (out_dir / "llvm").mkdir(exist_ok=True)
            cpu.export_library(str(out_dir / "llvm" / f"{name}.so"))
            programs[name] = {
                "path": f"metal/{name}",
                "format": "tvm-metal",
                "objects": sorted(p.name for p in objects.iterdir()),
                "shader_source": f"metal/{name}.metal",
                "kernels": len(kernels),
                "fused": fuse,
                "llvm": {"path": f"llvm/{name}.so", "format": "tvm-llvm"},
                "params": params,
                **program_ranges(plan, prefill),
            }
            files += [*objects.iterdir(), out_dir / "metal" / f"{name}.metal", out_dir / "llvm" / f"{name}.so"]
        requirements = {
            "tvm": TVM_VERSION,
            "metal_host": METAL_HOST_TRIPLE,
            # where the llvm build of the same module runs (verification off a Mac)
            "llvm_machine": platform.machine(),
            "llvm_system": platform.system().lower(),
        }
        return Lowered(executor="tvm", programs=programs, requirements=requirements, files=files)
