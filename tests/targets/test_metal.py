"""The metal target: steps lowered through TVM Relax to Metal source + arm64 objects, and the
same Relax module built for llvm, which is what runs (and is verified) on this machine."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from conftest import assert_clean_error, build_bundle, run_cli

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
    """Batch 3, a shared padded past with different valid lengths (one empty), prefill and decode."""
    from arle_models import build_model
    from arle_runtime.bundle import load_bundle
    from arle_runtime.tvm_executor import TvmExecutor

    bundle = load_bundle(tiny_metal_bundle)
    executor = TvmExecutor(bundle, threads=1, variant="llvm")
    model = build_model(bundle.config).fuse_projections().eval()
    model.load_state_dict(bundle.weights, strict=False)
    torch.manual_seed(1)
    past = 7
    past_k = torch.randn(executor.cache_shape(3, past))
    past_v = torch.randn(executor.cache_shape(3, past))
    past_lens = torch.tensor([7, 3, 0])
    for step, new, split in ((executor.prefill, 5, False), (executor.decode, 1, True)):
        tokens = torch.randint(0, bundle.config.vocab_size, (3, new))
        positions = past_lens[:, None] + torch.arange(new)[None]
        last = torch.full((3,), new - 1)
        got = step(tokens, positions, past_k, past_v, past_lens, last)
        model.use_split_attention(split)
        with torch.no_grad():
            want = model(tokens, positions, past_k, past_v, past_lens, last)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("quant", ["int4", "fp16"])
def test_metal_target_refuses_other_quantizations(tiny_hf_model, tmp_path, quant):
    proc = run_cli("arlec", "build", "--model", str(tiny_hf_model), "--quant", quant, "--target", "metal",
                   "--out", str(tmp_path / "x.arle"), env=ENV)
    assert_clean_error(proc, "supports only --quant fp32")
    assert not (tmp_path / "x.arle").exists()


def test_metal_bundle_for_another_llvm_machine_is_refused_in_one_sentence(tiny_metal_bundle, bundle_copy):
    b = bundle_copy(tiny_metal_bundle)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["target"]["requirements"]["llvm_machine"] = "riscv64"
    (b / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi", env=ENV), "targets Metal")


def test_slices_with_a_symbolic_bound_import_in_bounds():
    """TVM 0.27 imports `x[..., P:]` (P dynamic) with an unclamped INT64_MAX end, whose
    legalized shape fails a broadcast; with our converter the program builds and is exact.
    When the plain import starts to legalize, TVM has fixed it: drop slice_in_bounds."""
    import tvm
    from torch.export import Dim
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from arle_targets.tvm_lower import slice_in_bounds

    class SplitPast(torch.nn.Module):  # the shape of attention_split_past's weighted sums
        def forward(self, probs, past_v, v):
            P = past_v.shape[2]
            return probs[..., :P] @ past_v + probs[..., P:] @ v

    probs, past_v, v = torch.rand(1, 2, 1, 6), torch.rand(1, 2, 5, 4), torch.rand(1, 2, 1, 4)
    p = Dim("p", min=0, max=30)
    exported = torch.export.export(SplitPast(), (probs, past_v, v), dynamic_shapes=({3: p + 1}, {2: p}, None))
    with pytest.raises(Exception):
        relax.transform.LegalizeOps()(from_exported_program(exported))
    mod = from_exported_program(exported, custom_convert_map={"slice.Tensor": slice_in_bounds})
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(t.numpy()) for t in (probs, past_v, v)))
    torch.testing.assert_close(torch.from_numpy(got[0].numpy()), SplitPast()(probs, past_v, v))
