"""`arlec bench` and `arlec regress` on the default bundle, with short runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from arlec.bench import METRICS, compare, compare_table, read_baseline
from conftest import REPO, assert_clean_error, run_cli

SHORT = ("--prompt-tokens", "32", "--new-tokens", "8", "--repeats", "1")


@pytest.fixture(scope="module")
def baseline(default_bundle, tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("bench") / "baseline.json"
    proc = run_cli("arlec", "bench", str(default_bundle), *SHORT, "--out", str(out), env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(out.read_text()), proc.stdout


def test_bench_reports_every_metric_with_a_same_run_reference(baseline):
    _, result, table = baseline
    assert result["settings"] == {"prompt_tokens": 32, "new_tokens": 8, "repeats": 1, "batch": 1}
    for name in METRICS:
        assert result["metrics"][name] > 0 and math.isfinite(result["metrics"][name]), name
        assert result["ratios"][name] > 0 and math.isfinite(result["ratios"][name]), name
    assert result["runs"][0]["tokens"] == 8
    assert result["metrics"]["itl_p50_s"] <= result["metrics"]["itl_p99_s"]
    ref = result["reference"]
    assert ref["gemv_bytes_s"] > 0 and ref["gemm_flop_s"] > 0 and ref["threads"] == 1
    assert ref["gemv_matrix_bytes"] >= 0.9 * result["bundle"]["weight_bytes"]
    assert table.splitlines()[0].split() == ["metric", "value", "ratio"]
    assert "reference (eager torch, 1 threads): fp32 GEMV" in table


def test_regress_passes_against_a_baseline_from_the_same_machine(baseline, default_bundle):
    path, _, _ = baseline
    # A wide tolerance: this machine's two cores are shared, and one short run is noisy.
    proc = run_cli("arlec", "regress", str(default_bundle), "--baseline", str(path), "--tolerance", "300",
                   env={"ARLE_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REGRESSED" not in proc.stdout
    assert "another kind" not in proc.stderr and "baseline was made on" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["metric", "baseline", "current", "worse", "by", "verdict"]


def test_regress_exits_1_with_a_table_when_a_ratio_got_worse(baseline, default_bundle, tmp_path):
    path, result, _ = baseline
    result["ratios"]["decode_tok_s"] *= 100  # the baseline decoded 100x faster than anything can now
    result["machine"].update(cpu="Imaginary CPU 9000", cpu_features=["avx512f", "amx_tile"])
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(result))
    proc = run_cli("arlec", "regress", str(default_bundle), "--baseline", str(doctored), env={"ARLE_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("decode_tok_s"))
    assert row.endswith("REGRESSED")
    assert "worse than the baseline by more than 25%" in proc.stdout
    assert "note: the baseline was made on Imaginary CPU 9000 (avx512f, amx_tile), this run is on" in proc.stderr


def test_compare_knows_which_direction_is_worse():
    base = {"ratios": {name: 1.0 for name in METRICS}}
    now = {"ratios": {**base["ratios"], "decode_tok_s": 0.5, "ttft_s": 0.5, "itl_p99_s": 1.2}}
    rows = {r["metric"]: r for r in compare(now, base, 25)}
    assert rows["decode_tok_s"]["regressed"] and rows["decode_tok_s"]["worse_pct"] == pytest.approx(100)
    assert not rows["ttft_s"]["regressed"] and rows["ttft_s"]["worse_pct"] == pytest.approx(-50)
    assert not rows["itl_p99_s"]["regressed"]
    assert "1 of 6 ratio metrics" in compare_table(list(rows.values()), 25)


def test_the_cpu_note_needs_a_recorded_cpu_that_differs():
    from arlec.bench import cpu_facts, other_cpu_note

    here = {"machine": cpu_facts()}
    assert here["machine"]["cpu"] and isinstance(here["machine"]["cpu_features"], list)
    assert other_cpu_note(here, here) is None
    assert other_cpu_note({"machine": {"threads": 1}}, here) is None  # a baseline from before the record
    other = {"machine": {"cpu": here["machine"]["cpu"], "cpu_features": ["sve"]}}
    assert "(sve)" in other_cpu_note(other, here)


def test_regress_with_a_missing_baseline_is_a_clean_error(default_bundle, tmp_path):
    proc = run_cli("arlec", "regress", str(default_bundle), "--baseline", str(tmp_path / "none.json"))
    assert proc.returncode == 2
    assert_clean_error(proc, "arlec bench")


def test_bench_refuses_more_tokens_than_the_context(default_bundle):
    proc = run_cli("arlec", "bench", str(default_bundle), "--prompt-tokens", "5000", "--new-tokens", "8")
    assert proc.returncode == 2
    assert_clean_error(proc, "context")


def test_committed_cpu_baseline_is_a_bench_result():
    result = read_baseline(str(REPO / "baselines" / "cpu-smollm2-int8.json"))
    assert result["bundle"]["target"] == "cpu" and result["bundle"]["quantization"] == "int8"
    assert set(result["ratios"]) == set(METRICS)
