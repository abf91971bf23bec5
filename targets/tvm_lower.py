"""Lowering the step programs through Apache TVM Relax (the metal target's compiler).

torch.export (the same ExportedProgram the cpu target compiles) -> Relax via
`from_exported_program` -> one Relax pipeline per TVM target -> a VM executable. The
weights stay function parameters (keep_params_as_input) and are detached from the
module: no weight byte enters a compiled artifact; executors hand the bundle's mmapped
safetensors to the program by name, as the other targets do.

Workarounds for TVM 0.27.0 (docs/metal.md lists the upstream fixes that remove them):
- Slices with a symbolic bound (`probs[..., P:]` with P the dynamic past length) import
  with end = INT64_MAX unclamped, and legalize into shapes TVM cannot simplify
  (`max(if_then_else(s < -1, ...))`), which then fail a broadcast check. slice_in_bounds
  clamps the end to the dim and marks the slice in bounds (torch.export guarantees it).
- dlight's MetalMatmul (simdgroup) rule segfaults in Metal codegen: it is disabled, so
  Metal matmuls get dlight's generic GPU matmul schedule.
- FuseOps/FuseTIR broke the KV-cache decode step on cuda/metal (an HF Qwen3 module): fp32
  builds run without fusion. int4 builds need it (dequantize_into_matmul) and fuse; on our
  own steps that compiles for Metal. The llvm build keeps the same passes and adds only CPU
  schedules.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch

from arle_models import CausalLM

from .base import ShapePlan
from .cpu import export_step
from .tvm_cpu_schedule import nt_matmul_rule

TVM_VERSION = "0.27.0"  # the API (JSON-dict targets, tvm.tirx, tvm.s_tir) this module is written for
STEP_INPUTS = 6  # tokens, positions, past_k, past_v, past_lens, last_index (arle_models.layers)
METAL_HOST_TRIPLE = "arm64-apple-macos"


def import_tvm():
    from arle_runtime.errors import ArleError

    try:
        import tvm
    except ImportError:
        raise ArleError("The metal target needs Apache TVM; pip install 'arle[metal]'.") from None
    if not tvm.__version__.startswith(TVM_VERSION):
        raise ArleError(f"The metal target is written for apache-tvm {TVM_VERSION}, found {tvm.__version__}; "
                        "pip install 'arle[metal]'.")
    return tvm


def slice_in_bounds(node, importer):
    """`aten.slice` with a symbolic start, end or dim as an in-bounds strided_slice (see above)."""
    import tvm
    from tvm import relax, tirx

    def value(arg):  # a SymInt argument is an fx node the importer already turned into a PrimExpr
        return importer.env.get(arg, arg) if isinstance(arg, torch.fx.Node) else arg

    def symbolic(v) -> bool:
        return tvm.ir.is_prim_expr(v) and not isinstance(v, tirx.IntImm)

    x = importer.env[node.args[0]]
    args = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = args[1] or 0, value(args[2]), value(args[3]), args[4] or 1
    start = 0 if start is None else start
    shape = importer.shape_of(x)
    axis = dim % len(shape)
    if end is None or (isinstance(end, int) and end >= sys.maxsize):
        end = shape[axis]
    known_in_bounds = (symbolic(start) or start == 0) and (symbolic(end) or end is shape[axis])
    if step != 1 or not known_in_bounds or not any(symbolic(v) for v in (start, end, shape[axis])):
        return importer._slice(node)  # static, strided, or a literal bound that may exceed a symbolic dim
    if not symbolic(start) and end is shape[axis]:
        return x
    return importer.block_builder.emit(relax.op.strided_slice(x, [axis], [start], [end], [1], assume_inbound=True))


def clipped_takes(mod):
    """Every `take` (embedding lookup, cache layer select) with mode "clip" instead of the
    importer's "fast": an out-of-range token id then reads the last row instead of memory
    outside the table (TVM warns at every fast take that it segfaults on one)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class ClipTakes(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take" and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], axis=call.attrs.axis, mode="clip")
            return call

    rewriter = ClipTakes(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


METAL_MAX_BUFFERS = 31  # buffer arguments one Metal kernel may take (TVM warns past it; the kernel would not run)


def narrow_concats(mod, max_inputs: int = 16):
    """Every `concat` of more than max_inputs tensors as a concat of concats: stacking the
    new K (or V) of SmolLM2's 30 layers made one Metal kernel with 32 buffers, over Metal's
    31 (METAL_MAX_BUFFERS). Exact; one extra copy of the new rows."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class NarrowConcats(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            fields = getattr(call.args[0], "fields", None) if call.args else None
            if getattr(call.op, "name", None) != "relax.concat" or fields is None or len(fields) <= max_inputs:
                return call
            axis = call.attrs.axis
            parts = [self.builder_.emit(relax.op.concat(fields[i:i + max_inputs], axis=axis))
                     for i in range(0, len(fields), max_inputs)]
            return relax.op.concat(parts, axis=axis)

    rewriter = NarrowConcats(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def matmul_in_input_dtype(node, importer):
    """`aten.mm/bmm/matmul`: TVM 0.27's importer hard-codes a float32 result, so an fp16
    model's next op (the KV concat) meets mixed dtypes. Accumulate in float32, as torch's
    kernels do, and round to the input dtype, as torch returns. (One of two fp16 blockers;
    targets/metal.py says what the other is.)"""
    from tvm import relax

    a, b = importer.env[node.args[0]], importer.env[node.args[1]]
    out = importer.block_builder.emit(relax.op.matmul(a, b, out_dtype="float32"))
    dtype = str(a.ty.dtype)
    return out if dtype == "float32" else importer.block_builder.emit(relax.op.astype(out, dtype))


CONVERTERS = {"slice.Tensor": slice_in_bounds, **dict.fromkeys(("mm.default", "bmm.default", "matmul.default"),
                                                                matmul_in_input_dtype)}


def import_step(model: CausalLM, plan: ShapePlan, prefill: bool):
    """(Relax IRModule of one step with the weights as parameters, their state-dict names in order)."""
    from torch.export.graph_signature import InputKind
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    exported = export_step(model, plan, prefill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True,
                                    custom_convert_map=CONVERTERS)
    targets = {s.arg.name: s.target for s in exported.graph_signature.input_specs
               if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
    mod, _ = relax.frontend.detach_params(mod)  # the weights come from the bundle at load
    mod = narrow_concats(clipped_takes(mod))
    names = [targets[v.name] for v in mod["main"].params[STEP_INPUTS:]]
    return mod, names


def target_json(kind: str) -> dict:
    if kind == "metal":
        return {"kind": "metal", "host": {"kind": "llvm", "mtriple": METAL_HOST_TRIPLE}}
    return {"kind": "llvm"}


@contextlib.contextmanager
def metal_matmul_disabled():
    """dlight's Matmul rule tries MetalMatmul first on metal and falls back to its generic
    GPU schedule when that raises; make it raise instead of emitting simdgroup code that
    segfaults in codegen."""
    from tvm.s_tir.dlight.gpu import matmul

    def refuse(*_args, **_kwargs):
        raise NotImplementedError("MetalMatmul disabled: segfaults in Metal codegen on TVM 0.27")

    saved = matmul.MetalMatmul.apply
    matmul.MetalMatmul.apply = refuse
    try:
        yield
    finally:
        matmul.MetalMatmul.apply = saved


def dequantize_into_matmul():
    """Fold each int4 dequantization (FuseOps makes it one function that writes the float
    weight) into the matmul that reads it, so the float weight is never materialized: one
    kernel reads the packed nibbles (what MLC-LLM does for its quantized models). Runs after
    FuseOps/FuseTIR; matches by the fused functions' names."""
    from tvm import relax
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

    def is_dequantize_matmul(ctx) -> bool:
        dequant, mm = ctx.annotated_expr["weight"], ctx.annotated_expr["matmul"]
        return "floor_divide" in dequant.args[0].name_hint and "NT_matmul" in mm.args[0].name_hint

    patterns = []
    for dims in range(3):  # a matmul over symbolic dims takes their values as trailing fields (prefill: 2)
        weight = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard(), wildcard(), wildcard()]),
                                        add_constraint=False)  # packed nibbles, scales, zeros
        x = wildcard()  # one pattern object per field: a pattern matches one expression only
        fields = [x, weight] + [wildcard() for _ in range(dims)]
        matmul = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(fields), add_constraint=False)
        patterns.append((f"dequantize_matmul{dims}", matmul, {"x": x, "weight": weight, "matmul": matmul},
                         is_dequantize_matmul))
    return [relax.transform.FuseOpsByPattern(patterns), relax.transform.FuseTIR()]


def relax_pipeline(target, fuse: bool):
    """The target's default Relax pipeline with fusion optional and our schedule rules."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.relax.backend.gpu_generic import pipeline as gpu_generic
    from tvm.s_tir import dlight as dl

    backend = gpu_generic if target.kind.name == "metal" else cpu_generic
    if target.kind.name == "metal":
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    else:
        rules = [nt_matmul_rule(), dl.cpu.GEMV(), dl.cpu.Reduction()]
    # x @ W.T as one kernel reading W in place (else each step materializes every W.T).
    legalize = [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant()]
    if fuse:
        legalize += [relax.transform.FuseOps(), relax.transform.FuseTIR(), *dequantize_into_matmul()]
    passes = (backend.library_dispatch_passes(target) + legalize + [dl.ApplyDefaultSchedule(*rules)]
              + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def compile_step(mod, kind: str, fuse: bool):
    """A Relax VM executable of `mod` for kind 'llvm' (this machine) or 'metal' (Apple GPU, arm64 host)."""
    import tvm

    target = tvm.target.Target(target_json(kind))
    guard = metal_matmul_disabled() if kind == "metal" else contextlib.nullcontext()
    with guard:
        return tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, fuse))
