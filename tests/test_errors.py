"""Bad input gets one clear sentence and a non-zero exit: never a traceback or a half-written bundle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import assert_clean_error, default_sigint, run_cli


# ---------------------------------------------------------------- arlec build


def test_build_missing_model_source(tmp_path):
    assert_clean_error(run_cli("arlec", "build", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")),
                       "does not exist")


def test_build_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_clean_error(run_cli("arlec", "build", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b")),
                       "not supported")


def test_build_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    assert_clean_error(run_cli("arlec", "build", "--model", str(bad), "--out", str(tmp_path / "b")), "gguf")


def test_build_unknown_quant_and_target(tmp_path):
    assert_clean_error(run_cli("arlec", "build", "--quant", "int3", "--out", str(tmp_path / "b")), "quantization")
    assert_clean_error(run_cli("arlec", "build", "--target", "tpu", "--out", str(tmp_path / "b")), "target")


def test_build_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "exists.arle"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_clean_error(run_cli("arlec", "build", "--out", str(out)), "--force")
    assert (out / "keep.txt").read_text() == "user data"


def test_interrupted_build_leaves_nothing(tmp_path, tiny_hf_model):
    out = tmp_path / "interrupted.arle"
    exe = Path(sys.executable).parent / "arlec"
    proc = subprocess.Popen([str(exe), "build", "--model", str(tiny_hf_model), "--quant", "fp32", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    # Wait until the build is writing inside its temp folder, then interrupt it.
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".interrupted.arle.partial-*/weights")):
        time.sleep(0.2)
    assert list(tmp_path.glob(".interrupted.arle.partial-*")), "build never started writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- loading bundles


def test_run_missing_bundle(tmp_path):
    assert_clean_error(run_cli("arle-runtime", "run", str(tmp_path / "none.arle"), "--prompt", "hi"), "does not exist")


def test_corrupt_manifest(tiny_bundle, bundle_copy):
    b = bundle_copy(tiny_bundle)
    (b / "manifest.json").write_text("{ not json")
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi"), "corrupt")


def test_checksum_mismatch(tiny_bundle, bundle_copy):
    b = bundle_copy(tiny_bundle)
    weights = b / "weights" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi"), "checksum")
    assert_clean_error(run_cli("arlec", "verify", str(b)), "checksum")


def test_missing_artifact(tiny_bundle, bundle_copy):
    b = bundle_copy(tiny_bundle)
    (b / "cpu" / "decode.pt2").unlink()
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi"), "missing")


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_newer_schema(tiny_bundle, bundle_copy):
    b = bundle_copy(tiny_bundle)
    _edit_manifest(b, lambda m: m.update(schema_version=99))
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi"), "newer")


def test_bundle_for_another_target(tiny_bundle, bundle_copy):
    b = bundle_copy(tiny_bundle)
    _edit_manifest(b, lambda m: m["target"].update(name="metal"))
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi"), "metal")


def test_bundle_from_another_torch(tiny_bundle, bundle_copy):
    b = bundle_copy(tiny_bundle)
    _edit_manifest(b, lambda m: m["target"]["requirements"].update(torch="1.13.0"))
    assert_clean_error(run_cli("arle-runtime", "run", str(b), "--prompt", "hi"), "torch")


# ---------------------------------------------------------------- prompts


def test_empty_prompt(tiny_bundle):
    assert_clean_error(run_cli("arle-runtime", "run", str(tiny_bundle), "--prompt", "   "), "empty")
    assert_clean_error(run_cli("arle-runtime", "run", str(tiny_bundle), "--stdin", stdin=""), "empty")


def test_prompt_and_stdin_are_exclusive(tiny_bundle):
    assert_clean_error(run_cli("arle-runtime", "run", str(tiny_bundle)), "--prompt")


def test_prompt_longer_than_context(tiny_bundle):
    proc = run_cli("arle-runtime", "run", str(tiny_bundle), "--raw", "--prompt", "word " * 200)
    assert_clean_error(proc, "context")


def test_generation_stops_at_context_end(tiny_bundle):
    proc = run_cli("arle-runtime", "run", str(tiny_bundle), "--raw", "--prompt", "word " * 50, "--max-tokens", "100",
                   "--json", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] + out["completion_tokens"] <= 64


def test_bad_sampling_values(tiny_bundle):
    assert_clean_error(run_cli("arle-runtime", "run", str(tiny_bundle), "--prompt", "hi", "--top-p", "0"), "top_p")
    assert_clean_error(run_cli("arle-runtime", "run", str(tiny_bundle), "--prompt", "hi", "--max-tokens", "0"),
                       "max_tokens")
