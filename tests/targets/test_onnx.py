"""The onnx target: ONNX step programs (torch.onnx dynamo export) run by onnxruntime on CPU."""

from __future__ import annotations

import json

import pytest

from conftest import assert_clean_error, assert_steps_equal_eager_torch, build_bundle, run_cli

pytest.importorskip("onnxruntime", reason="the onnx target runs on onnxruntime, which is not installed")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript, which is not installed")

ENV = {"ARLE_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_onnx_bundle(bundle_dir, tiny_hf_model):
    return build_bundle(bundle_dir, "tiny-fp32-onnx", "--model", str(tiny_hf_model), "--quant", "fp32",
                        "--target", "onnx", "--max-batch", "4", "--max-prefill-tokens", "32", "--max-context", "64")


def test_onnx_bundle_holds_graphs_whose_weights_live_in_the_safetensors(tiny_onnx_bundle):
    import onnx

    manifest = json.loads((tiny_onnx_bundle / "manifest.json").read_text())
    assert manifest["target"]["name"] == "onnx" and manifest["target"]["executor"] == "onnxruntime"
    assert {p["format"] for p in manifest["programs"].values()} == {"onnx"}
    for program in manifest["programs"].values():
        proto = onnx.load(str(tiny_onnx_bundle / program["path"]), load_external_data=False)
        external = {e.value for init in proto.graph.initializer for e in init.external_data if e.key == "location"}
        assert external == {"weights/model.safetensors"}  # weights stored once, no second copy
    assert not list(tiny_onnx_bundle.rglob("*.data"))


def test_arlec_verify_passes_on_an_onnx_bundle(tiny_onnx_bundle):
    proc = run_cli("arlec", "verify", str(tiny_onnx_bundle), env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "greedy      ok" in proc.stdout and "logits      ok" in proc.stdout


def test_onnx_steps_equal_eager_torch_for_ragged_batches(tiny_onnx_bundle):
    from arle_runtime.bundle import load_bundle
    from arle_runtime.onnx_executor import OnnxExecutor

    bundle = load_bundle(tiny_onnx_bundle)
    assert_steps_equal_eager_torch(bundle, OnnxExecutor(bundle, threads=1))


def test_arle_runtime_run_on_onnx_equals_the_cpu_bundle(tiny_onnx_bundle, tiny_bundle):
    def run(bundle):
        proc = run_cli("arle-runtime", "run", str(bundle), "--prompt", "Name three colours.", "--max-tokens", "16",
                       "--json", env=ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    onnx_out, cpu_out = run(tiny_onnx_bundle), run(tiny_bundle)
    assert onnx_out["completion_tokens"] == 16
    assert onnx_out["token_ids"] == cpu_out["token_ids"]


def test_fp16_onnx_bundle_builds_and_verifies(bundle_dir, tiny_hf_model):
    bundle = build_bundle(bundle_dir, "tiny-fp16-onnx", "--model", str(tiny_hf_model), "--quant", "fp16",
                          "--target", "onnx", "--max-batch", "2", "--max-prefill-tokens", "16", "--max-context", "64")
    proc = run_cli("arlec", "verify", str(bundle), env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((bundle / "manifest.json").read_text())["kv_cache"]["dtype"] == "float16"


def test_onnx_target_refuses_other_quantizations(tiny_hf_model, tmp_path):
    proc = run_cli("arlec", "build", "--model", str(tiny_hf_model), "--quant", "bf16", "--target", "onnx",
                   "--out", str(tmp_path / "x.arle"), env=ENV)
    assert_clean_error(proc, "supports only --quant fp32 or fp16")
    assert not (tmp_path / "x.arle").exists()
