"""`arlec doctor`: one finding per check, the exit code from the worst status."""

from __future__ import annotations

import json
import shutil

from arlec import doctor
from conftest import assert_clean_error, run_cli


def test_doctor_json_lists_every_check_and_exit_code_follows_strict(tiny_bundle):
    proc = run_cli("arlec", "doctor", "--json", "--strict", "--bundle", str(tiny_bundle))
    report = json.loads(proc.stdout)
    names = [f["name"] for f in report["findings"]]
    for name in ("python", "torch", "triton", "cuda", "tvm", "onnxruntime", "sandbox", "disk", "bundle"):
        assert name in names
    assert all(f["status"] in ("ok", "warn", "fail") for f in report["findings"])
    assert {f["name"]: f["status"] for f in report["findings"]}["bundle"] == "ok"
    worst_bad = any(f["status"] != "ok" for f in report["findings"])
    assert proc.returncode == report["exit_code"] == (1 if worst_bad else 0)


def test_doctor_table_exits_0_without_failures():
    proc = run_cli("arlec", "doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert any(line.startswith("torch") and " ok " in line for line in lines)
    assert "fail" in lines[-1] and "ok" in lines[-1]


def test_doctor_fails_a_bundle_for_another_torch(tiny_bundle, bundle_copy):
    bundle = bundle_copy(tiny_bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"]["requirements"]["torch"] = "1.0.0"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    finding = doctor.check_bundle(str(bundle))
    assert finding.status == "fail" and "torch 1.0.0" in finding.detail
    assert doctor.exit_code([finding]) == 1


def test_doctor_fails_a_bundle_with_a_missing_file(tiny_bundle, bundle_copy):
    bundle = bundle_copy(tiny_bundle)
    (bundle / "tokenizer.json").unlink()
    finding = doctor.check_bundle(str(bundle))
    assert finding.status == "fail" and "missing tokenizer.json" in finding.detail


def test_doctor_warns_without_bubblewrap(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None if name == "bwrap" else real(name))
    finding = doctor.check_sandbox()
    assert finding.status == "warn" and "bubblewrap" in finding.advice.lower() + finding.detail.lower()
    assert doctor.exit_code([finding]) == 0 and doctor.exit_code([finding], strict=True) == 1


def test_doctor_missing_bundle_is_a_clean_error():
    proc = run_cli("arlec", "doctor", "--bundle", "/nonexistent/x.arle")
    assert proc.returncode == 2
    assert_clean_error(proc, "does not exist")


def test_doctor_reports_each_gpu_and_warns_below_ampere(monkeypatch):
    import types

    import torch

    caps = [(9, 0), (7, 5)]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=["NVIDIA H200", "Tesla T4"][i], total_memory=[141 << 30, 16 << 30][i]))
    monkeypatch.setattr(doctor, "_nvidia_smi", lambda field: "580.65")
    findings = {f.name: f for f in doctor.check_cuda()}
    assert findings["cuda"].status == "ok" and findings["cuda"].detail == "CUDA 13.0, driver 580.65, 2 GPU(s)"
    assert findings["gpu 0"].status == "ok" and "capability 9.0" in findings["gpu 0"].detail
    assert findings["gpu 1"].status == "warn" and "8.0" in findings["gpu 1"].advice
