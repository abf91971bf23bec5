"""ONNX target: the prefill and decode steps exported with torch.onnx.export(dynamo=True)
into portable ONNX graphs, run by onnxruntime's CPU execution provider.

Same step contract as the cpu target (KV cache as inputs/outputs; dynamic batch, new-token
and past dims). The graphs hold no weight bytes: every parameter initializer is relinked
as ONNX external data pointing into the bundle's weights/model.safetensors by byte offset.
So the weights are stored once, in the same 64-byte-aligned file every target writes
(not a second ~0.5 GB copy per program), checksummed with the bundle, and read by
onnxruntime straight from the file at session creation. onnxruntime refuses external data
outside the model's own folder, which is why the .onnx files sit at the bundle root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import struct
import warnings
from pathlib import Path

import torch

from arle_models import CausalLM
from arle_runtime.errors import ArleError

from .base import Lowered, ShapePlan
from .cpu import example_inputs, program_ranges, step_dynamic_shapes

# Measured with onnxruntime 1.32's CPU provider: fp16 graphs load and match torch (logits
# within fp16 rounding); bf16 graphs are rejected at load (SplitToSequence, for one, has
# no bf16 kernel); int8/int4 are the cpu target's ATen weight-only kernels, which ONNX lacks.
SUPPORTED_QUANTS = ("fp32", "fp16")
INPUT_NAMES = ["tokens", "positions", "past_k", "past_v", "past_lens", "last_index"]
OUTPUT_NAMES = ["logits", "new_k", "new_v"]
WEIGHTS_PATH = "weights/model.safetensors"


@contextlib.contextmanager
def quiet_exporter():
    # The exporter logs a warning per torchvision op it cannot register; none is used here.
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx_step(model: CausalLM, plan: ShapePlan, prefill: bool, path: Path) -> None:
    """Export one step to path (+ path.data holding its initializers, relinked afterwards)."""
    args = example_inputs(model, batch=2, tokens=3 if prefill else 1, past=5)
    model.use_split_attention(not prefill)
    try:
        with torch.no_grad(), quiet_exporter():
            # optimize=False keeps every initializer a named parameter (the optimizer folds
            # transposes and dedupes equal tensors into anonymous constants, which could not
            # point into the weights file); onnxruntime applies its own graph optimizations.
            program = torch.onnx.export(
                model, args, dynamo=True, dynamic_shapes=step_dynamic_shapes(plan, prefill),
                input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, optimize=False, verbose=False,
            )
            program.save(str(path), external_data=True)
    finally:
        model.use_split_attention(False)


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, header) of a safetensors file."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return 8 + size, header


def tied_names(model: CausalLM, header: dict) -> dict[str, str]:
    """Parameter name -> the name it is stored under in the weights file (ties resolved)."""
    stored = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    by_ptr = {(t.data_ptr(), tuple(t.shape)): n for n, t in named if n in header}
    for name, t in named:
        stored[name] = name if name in header else by_ptr.get((t.data_ptr(), tuple(t.shape)), name)
    return stored


ONNX_DTYPES = {"F32": 1, "F16": 10, "BF16": 16, "I64": 7, "I32": 6, "I8": 3, "U8": 2, "BOOL": 9}


def relink_initializers(onnx_path: Path, out_path: Path, root: Path, model: CausalLM) -> int:
    """Rewrite onnx_path's initializers that are model weights as external data into the
    bundle's weights file (offset/length); the rest stay inline. Returns how many were relinked."""
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(onnx_path), load_external_data=True)
    base, header = safetensors_layout(root / WEIGHTS_PATH)
    stored = tied_names(model, header)
    relinked = 0
    with open(root / WEIGHTS_PATH, "rb") as weights:
        for init in proto.graph.initializer:
            entry = header.get(stored.get(init.name, init.name))
            if entry is None:
                continue
            start, end = entry["data_offsets"]
            if ONNX_DTYPES.get(entry["dtype"]) != init.data_type or list(entry["shape"]) != list(init.dims):
                raise ArleError(f"The ONNX export changed the weight {init.name}; this model cannot be built for onnx.")
            weights.seek(base + start)
            if weights.read(end - start) != init.raw_data:
                raise ArleError(f"The ONNX export changed the values of {init.name}; this model cannot be built for onnx.")
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", WEIGHTS_PATH), ("offset", str(base + start)), ("length", str(end - start))):
                item = init.external_data.add()
                item.key, item.value = key, value
            relinked += 1
    if relinked == 0:  # a changed exporter naming scheme would otherwise inline every weight
        raise ArleError("The ONNX export named no initializer after a model weight; this torch version is not supported.")
    for node in proto.graph.node:  # the exporter's per-node stack traces: build-machine paths, most of the file
        del node.metadata_props[:]
    onnx.save(proto, str(out_path))
    return relinked


class OnnxTarget:
    name = "onnx"

    def check(self, quant_scheme: str) -> None:
        if quant_scheme not in SUPPORTED_QUANTS:
            raise ArleError(
                f"The onnx target supports only --quant fp32 or fp16 (onnxruntime's CPU provider cannot run "
                f"these graphs in {quant_scheme}); use one of those, or --target cpu for {quant_scheme}."
            )
        if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
            raise ArleError("The onnx target needs the onnx and onnxscript packages; pip install 'arle[onnx]'.")

    def lower(self, model: CausalLM, plan: ShapePlan, out_dir: Path, progress) -> Lowered:
        import onnx

        programs, files = {}, []
        scratch = out_dir / ".onnx-export"
        scratch.mkdir(exist_ok=True)
        try:
            for name, prefill in (("prefill", True), ("decode", False)):
                progress(f"export {name} (ONNX)")
                exported = scratch / f"{name}.onnx"
                export_onnx_step(model, plan, prefill, exported)
                progress(f"link {name} weights")
                path = out_dir / f"{name}.onnx"
                relink_initializers(exported, path, out_dir, model)
                programs[name] = {"path": path.name, "format": "onnx", **program_ranges(plan, prefill)}
                files.append(path)
        finally:
            for p in scratch.iterdir():
                p.unlink()
            scratch.rmdir()
        opset = next((o.version for o in onnx.load(str(out_dir / "decode.onnx"), load_external_data=False).opset_import
                      if o.domain in ("", "ai.onnx")), None)
        requirements = {"onnx_opset": opset}  # portable: no torch release or CPU architecture
        return Lowered(executor="onnxruntime", programs=programs, requirements=requirements, files=files)
