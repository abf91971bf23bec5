"""The metal target: steps lowered through TVM Relax to Metal source + arm64 objects, and the
same Relax module built for llvm, which is what runs (and is verified) on this machine."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, assert_steps_equal_eager_torch, build_bundle, run_cli

pytest.importorskip("tvm", reason="the metal target lowers through Apache TVM, which is not installed")

ENV = {"ARLE_THREADS": "1"}
MACHO_ARM64 = (0xFEEDFACF, 0x0100000C)  # 64-bit Mach-O magic, CPU_TYPE_ARM64


@pytest.fixture(scope="module")
def tiny_metal_bundle(bundle_dir, tiny_hf_model):
    return build_bundle(bundle_dir, "tiny-fp32-metal", "--model", str(tiny_hf_model), "--quant", "fp32",
                        "--target", "metal", "--max-batch", "4", "--max-prefill-tokens", "32", "--max-context", "64")


def test_metal_bundle_holds_arm64_objects_and_metal_kernels_for_both_steps(tiny_metal_bundle):
    manifest = json.loads((tiny_metal_bundle / "manifest.json").read_text())
    target = manifest["target"]
    assert target["name"] == "metal" and target["executor"] == "tvm"
    assert target["requirements"]["metal_host"] == "arm64-apple-macos"
    assert set(manifest["programs"]) == {"prefill", "decode"}
    weights = json.loads((tiny_metal_bundle / "weights" / "model.safetensors").read_bytes()[8:][
        : struct.unpack("<Q", (tiny_metal_bundle / "weights" / "model.safetensors").read_bytes()[:8])[0]])
    stored = set(weights) | set(manifest["weights"]["tied"])
    for name, program in manifest["programs"].items():
        assert program["format"] == "tvm-metal"
        assert program["objects"] == ["devc.o", "lib0.o"]  # host code + packed Metal module and VM bytecode
        for obj in program["objects"]:
            header = (tiny_metal_bundle / program["path"] / obj).read_bytes()[:8]
            assert struct.unpack("<II", header) == MACHO_ARM64, (name, obj)
        source = (tiny_metal_bundle / program["shader_source"]).read_text()
        assert "#include <metal_stdlib>" in source
        kernels = [line for line in source.splitlines() if line.startswith("kernel void ")]
        assert len(kernels) == program["kernels"] > 10
        assert any("NT_matmul" in k for k in kernels)  # x @ W.T as one kernel reading W in place
        assert program["llvm"]["format"] == "tvm-llvm" and (tiny_metal_bundle / program["llvm"]["path"]).is_file()
        assert program["params"] and set(program["params"]) <= stored  # weights come from the bundle only
    assert program["tokens"] == [1, 1] and manifest["programs"]["prefill"]["tokens"] == [1, 32]


def test_arlec_verify_runs_the_llvm_build_of_a_metal_bundle(tiny_metal_bundle):
    proc = run_cli("arlec", "verify", str(tiny_metal_bundle), env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "greedy      ok" in proc.stdout and "logits      ok" in proc.stdout


def test_llvm_steps_equal_eager_torch_for_ragged_batches(tiny_metal_bundle):
    from arle_runtime.bundle import load_bundle
    from arle_runtime.tvm_executor import TvmExecutor

    bundle = load_bundle(tiny_metal_bundle)
    assert_steps_equal_eager_torch(bundle, TvmExecutor(bundle, threads=1, variant="llvm"), split_decode=True)


def test_llvm_build_refuses_steps_outside_the_manifest_ranges(tiny_metal_bundle):
    from arle_runtime.bundle import load_bundle
    from arle_runtime.errors import ArleError
    from arle_runtime.tvm_executor import TvmExecutor

    executor = TvmExecutor(load_bundle(tiny_metal_bundle), threads=1, variant="llvm")
    cache = torch.zeros(executor.cache_shape(5, 0))
    five = torch.zeros(5, 1, dtype=torch.long)
    with pytest.raises(ArleError, match="batch of 5"):
        executor.decode(five, five, cache, cache, five[:, 0], five[:, 0])


def test_an_out_of_range_token_id_reads_the_last_embedding_row_not_stray_memory(tiny_metal_bundle):
    from arle_runtime.bundle import load_bundle
    from arle_runtime.tvm_executor import TvmExecutor

    bundle = load_bundle(tiny_metal_bundle)
    executor = TvmExecutor(bundle, threads=1, variant="llvm")
    cache = torch.zeros(executor.cache_shape(1, 0))
    zero = torch.zeros(1, dtype=torch.long)
    vocab = bundle.config.vocab_size
    outside, last = (executor.decode(torch.tensor([[t]]), zero[None], cache, cache, zero, zero)[0]
                     for t in (vocab + 1000, vocab - 1))
    torch.testing.assert_close(outside, last)


def test_arle_runtime_run_on_a_metal_bundle_equals_the_cpu_bundle(tiny_metal_bundle, tiny_bundle):
    def run(bundle):
        proc = run_cli("arle-runtime", "run", str(bundle), "--prompt", "Name three colours.", "--max-tokens", "12",
                       "--json", env=ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    metal_out, cpu_out = run(tiny_metal_bundle), run(tiny_bundle)
    assert metal_out["completion_tokens"] == 12
    assert metal_out["token_ids"] == cpu_out["token_ids"]


@pytest.mark.parametrize("quant", ["int8", "fp16"])
def test_metal_target_refuses_other_quantizations(tiny_hf_model, tmp_path, quant):
    proc = run_cli("arlec", "build", "--model", str(tiny_hf_model), "--quant", quant, "--target", "metal",
                   "--out", str(tmp_path / "x.arle"), env=ENV)
    assert_clean_error(proc, "supports only --quant fp32 or int4")
    assert not (tmp_path / "x.arle").exists()


def quant_test_module():
    """tests/arlec/test_quant.py: its tiny model and the int4 TOLERANCE the cpu path is held to."""
    path = Path(__file__).parents[1] / "arlec" / "test_quant.py"
    spec = importlib.util.spec_from_file_location("arle_tests_quant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_int4_metal_bundle(bundle_dir, tiny_hf_model):
    return build_bundle(bundle_dir, "tiny-int4-metal", "--model", str(tiny_hf_model), "--quant", "int4",
                        "--target", "metal", "--max-batch", "4", "--max-prefill-tokens", "32", "--max-context", "64")


def test_int4_metal_bundle_stores_packed_nibbles_and_fuses_them_into_every_matmul(tiny_int4_metal_bundle):
    from safetensors import safe_open

    manifest = json.loads((tiny_int4_metal_bundle / "manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": "int4", "compute_dtype": "float32", "group_size": 32}
    assert manifest["kv_cache"]["dtype"] == "float32"
    with safe_open(tiny_int4_metal_bundle / "weights" / "model.safetensors", "pt") as f:
        qkv = f.get_tensor("layers.0.self_attn.qkv_proj.weight")
        scales = f.get_tensor("layers.0.self_attn.qkv_proj.scales")
    assert qkv.dtype == torch.uint8 and qkv.shape == (128, 32)  # (4 + 2 + 2 heads) x 16 rows, 64 inputs / 2
    assert scales.shape == (128, 2)  # one per 32 inputs
    for program in manifest["programs"].values():
        assert program["fused"]
        assert {"layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.zeros"} <= set(program["params"])
        source = (tiny_int4_metal_bundle / program["shader_source"]).read_text()
        kernels = [line for line in source.splitlines() if line.startswith("kernel void")]
        dequant_matmuls = [k for k in kernels if "floor_divide" in k and "NT_matmul" in k]
        assert len(dequant_matmuls) == 4  # qkv, o, gate_up, down: the float weight is never written
        assert not [k for k in kernels if "floor_divide" in k and "NT_matmul" not in k]
        assert (tiny_int4_metal_bundle / program["llvm"]["path"]).stat().st_size < 2 << 20  # no weight bytes


def test_arlec_verify_passes_on_an_int4_metal_bundle(tiny_int4_metal_bundle):
    proc = run_cli("arlec", "verify", str(tiny_int4_metal_bundle), env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "greedy      ok" in proc.stdout and "logits      ok" in proc.stdout


def last_logits(step, tokens) -> torch.Tensor:
    """A prefill step's logits at the last position of each row, from an empty cache."""
    B, T = tokens.shape
    return step(tokens, torch.arange(T).repeat(B, 1), torch.zeros(B, dtype=torch.long), torch.full((B,), T - 1))


def test_int4_metal_bundle_has_the_cpu_int4_paths_quantization_error(tiny_int4_metal_bundle, tiny_hf_model):
    """Same weights, same int4 math: the llvm build's distance to the float model matches the
    eager cpu int4 path's (ATen kernels, bf16) to 5%, i.e. nothing beyond quantization is lost."""
    import copy

    from arle_models import build_model
    from arle_runtime.bundle import load_bundle
    from arle_runtime.tvm_executor import TvmExecutor
    from arlec.quant import parse_quant, quantize_model
    from arlec.sources import load_source

    spec = load_source(str(tiny_hf_model))
    model = build_model(spec.config).eval()
    model.load_state_dict(spec.tensors, strict=False)
    model.fuse_projections()
    executor = TvmExecutor(load_bundle(tiny_int4_metal_bundle), threads=1, variant="llvm")
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (3, 24))

    def eager(m):
        with torch.no_grad():
            return last_logits(lambda *a: m(a[0], a[1], m.empty_cache(3, 0), m.empty_cache(3, 0), *a[2:])[0], tokens)

    cache = torch.zeros(executor.cache_shape(3, 0))
    metal = last_logits(lambda *a: executor.prefill(a[0], a[1], cache, cache, *a[2:])[0], tokens)
    ref, cpu = eager(model), eager(quantize_model(copy.deepcopy(model), parse_quant("int4", 32)).eval()).float()
    rel_metal, rel_cpu = ((metal - ref).norm() / ref.norm()).item(), ((cpu - ref).norm() / ref.norm()).item()
    assert rel_metal > 1e-3 and abs(rel_metal - rel_cpu) < 0.05 * rel_cpu, (rel_metal, rel_cpu)


def test_lowered_int4_step_is_within_the_int4_tolerance_on_the_quant_tests_model():
    """test_quant.py's model (the one TOLERANCE was measured on), int4 for metal, its prefill
    step lowered through TVM and run on llvm: logits within the cpu int4 path's bound."""
    import copy

    import tvm
    from tvm import relax

    from arle_models import build_model
    from arle_targets.base import ShapePlan
    from arle_targets.tvm_lower import compile_step, import_step
    from arlec.quant import for_target, parse_quant, quantize_model

    quant_tests = quant_test_module()
    torch.manual_seed(0)
    base = build_model(quant_tests.tiny_config(tie=True)).eval().fuse_projections()
    model = quantize_model(copy.deepcopy(base), for_target(parse_quant("int4", 32), "metal"), kernels="metal").eval()
    mod, names = import_step(model, ShapePlan(4, (1, 2, 4), 32, 64, kv_dtype="float32"), prefill=True)
    vm = relax.VirtualMachine(compile_step(mod, "llvm", fuse=True), tvm.cpu())
    weights = [tvm.runtime.tensor(model.state_dict()[n].contiguous().numpy()) for n in names]
    empty = model.empty_cache(2, 0)

    def lowered(*args):
        args = (args[0], args[1], empty, empty, *args[2:])
        return torch.from_numpy(vm["main"](*(tvm.runtime.from_dlpack(a.contiguous()) if a.numel() else
                                             tvm.runtime.empty(tuple(a.shape), "float32", tvm.cpu()) for a in args),
                                           *weights)[0].numpy())

    tokens = torch.randint(0, 256, (2, 24))
    got = last_logits(lowered, tokens)
    with torch.no_grad():
        ref = last_logits(lambda *a: base(a[0], a[1], empty, empty, *a[2:])[0], tokens)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < quant_tests.TOLERANCE["int4"], rel


def test_wide_concats_are_split_below_metals_buffer_limit_and_stay_exact():
    """Stacking 30 layers' new K made a 32-buffer Metal kernel (Metal allows 31)."""
    import re

    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from arle_targets.metal import device_sources
    from arle_targets.tvm_lower import METAL_MAX_BUFFERS, compile_step, narrow_concats

    class StackLayers(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x * i for i in range(30)])

    x = torch.rand(2, 3)
    mod = narrow_concats(from_exported_program(torch.export.export(StackLayers(), (x,))))
    got = relax.VirtualMachine(compile_step(mod, "llvm", fuse=False), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    torch.testing.assert_close(torch.from_numpy(got[0].numpy()), StackLayers()(x))
    source = "\n".join(device_sources(compile_step(mod, "metal", fuse=False).mod, "metal"))
    buffers = [m.group(1).count("[[ buffer(") for m in re.finditer(r"kernel void \w+\((.*?)\)\s*\{", source, re.S)]
    assert buffers and max(buffers) <= METAL_MAX_BUFFERS
