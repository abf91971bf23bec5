"""CI's speed check: the default bundle against the committed CPU baseline
(baselines/cpu-smollm2-int8.json; baselines/README.md says how it was made and how to remake it).

Noise-robust three ways: `regress` compares ratios to an eager-torch reference measured in
the same process (not raw tok/s); each ratio is the median of the baseline's 5 runs; and
`--best-of 3` reruns while a metric is out of tolerance, keeping each metric's best, so a
metric fails only when it is slow every time. On the shared 2-core machine single runs
were up to 37% worse than the baseline (itl_p99, prefill; load average 2.5-3.7) and the
best of three at most 16%; a real 2x slowdown is 100% worse, so TOLERANCE_PCT is 50.
The ratios also move with the kind of CPU (the same code: decode 0.27 on the host that made
the first baseline, 0.19 on an AVX2-only EPYC), so the baseline is made on the slower kind
CI has drawn, and a regress run says when the baseline's CPU differs from its own.
One run takes about 40 s; more only when the first is out of tolerance.
"""

from __future__ import annotations

import json

import pytest

from arlec.bench import METRICS, compare
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

BASELINE = REPO / "baselines" / "cpu-smollm2-int8.json"
TOLERANCE_PCT = 50
BEST_OF = 3
# The command CI runs (the README's pytest run includes this test); baselines/README.md shows it.
COMMAND = ("arlec", "regress", "{bundle}", "--baseline", "baselines/cpu-smollm2-int8.json",
           "--tolerance", str(TOLERANCE_PCT), "--best-of", str(BEST_OF), "--json")


@pytest.fixture(scope="module")
def regress_result(default_bundle) -> dict:
    # The baseline ran on one thread; so must this (2 threads on a busy 2-core box swing 100x).
    args = [a.format(bundle=default_bundle) for a in COMMAND]
    proc = run_cli(*args, env={"ARLE_THREADS": "1"}, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    result["returncode"] = proc.returncode
    result["stderr"] = proc.stderr[-1000:]
    return result


def test_default_bundle_is_not_slower_than_the_committed_cpu_baseline(regress_result):
    rows = regress_result["rows"]
    table = "\n".join(f"{r['metric']:<16}{r['baseline']:>10.3f}{r['current']:>10.3f}{r['worse_pct']:>8.1f}%"
                      f"  {'REGRESSED' if r['regressed'] else 'ok'}" for r in rows)
    assert {r["metric"] for r in rows} == set(METRICS), table
    assert regress_result["returncode"] == 0 and not regress_result["regressed"], (
        f"speed regression (best of {regress_result['runs']} runs, tolerance {TOLERANCE_PCT}%):\n{table}\n"
        f"If the slowdown is intended, remake the baseline (baselines/README.md).")


def test_the_tolerance_trips_on_a_2x_slowdown_of_this_run(regress_result):
    # What the run just measured, made 2x slower: every metric must then fail the same check.
    now = {r["metric"]: r["current"] for r in regress_result["rows"]}
    slower = {m: v / 2 if METRICS[m][1] else v * 2 for m, v in now.items()}
    baseline = json.loads(BASELINE.read_text())
    rows = compare({"ratios": slower}, baseline, TOLERANCE_PCT)
    # Only as sure as this run is close to the baseline: one more than 25% faster would hide it.
    close = [r["metric"] for r in regress_result["rows"] if r["worse_pct"] > -25]
    assert close, regress_result["rows"]
    assert all(r["regressed"] for r in rows if r["metric"] in close), rows


def test_best_of_keeps_each_metrics_best_run():
    from arlec.bench import best_rows

    base = {"ratios": {name: 1.0 for name in METRICS}}
    first = compare({"ratios": {**base["ratios"], "decode_tok_s": 0.5, "itl_p99_s": 1.0}}, base, TOLERANCE_PCT)
    second = compare({"ratios": {**base["ratios"], "decode_tok_s": 0.9, "itl_p99_s": 2.0}}, base, TOLERANCE_PCT)
    rows = {r["metric"]: r for r in best_rows(first, second)}
    assert rows["decode_tok_s"]["current"] == 0.9 and not rows["decode_tok_s"]["regressed"]
    assert rows["itl_p99_s"]["current"] == 1.0 and not rows["itl_p99_s"]["regressed"]
    slow_twice = best_rows(first, first)
    assert [r["metric"] for r in slow_twice if r["regressed"]] == ["decode_tok_s"]


def test_peak_memory_is_the_processs_own_not_its_parents():
    # Linux's ru_maxrss counts the parent's resident memory at fork/exec: regress run from
    # a pytest that held torch once read 2.1x the baseline's memory ratio.
    import subprocess
    import sys

    parent = bytearray(512 << 20)
    parent[:: 4096] = b"\1" * len(parent[:: 4096])  # resident, not just reserved
    child = subprocess.run([sys.executable, "-c", "from arlec.bench import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) < 256 << 20, child.stdout
    del parent
