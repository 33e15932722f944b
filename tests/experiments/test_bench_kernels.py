"""`experiments/bench_kernels.py` runs end to end on a CPU (`--smoke`: tiny sizes, kernels interpreted)
and judges the issue's goals from the rows it measured; its timings here mean nothing."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "experiments")
sys.path.insert(0, os.path.abspath(EXPERIMENTS))

import bench_kernels  # noqa: E402


def _row(op, seq, fwd_ms, fwd_bwd_ms, fwd_tflops=1.0, fwd_bwd_tflops=1.0):
    return dict(op=op, seq=seq, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, fwd_tflops=fwd_tflops,
                fwd_bwd_tflops=fwd_bwd_tflops)


def test_goals_are_judged_from_the_measured_rows():
    rows = bench_kernels.add_fractions([
        _row("dense_flash", 32768, 10.0, 30.0, fwd_tflops=500.0, fwd_bwd_tflops=400.0),
        _row("pallas_sliding_window", 32768, 1.0, 3.0, fwd_tflops=350.0, fwd_bwd_tflops=200.0),
        _row("pallas_sliding_window_causal", 32768, 1.0, 2.0),
        _row("cudnn_sliding_window_causal", 32768, 1.5, 1.0),
        _row("pallas_favor", 32768, 2.0, 4.0),
        _row("pallas_favor_causal", 32768, 2.5, 8.0),
        _row("dense_flash", 4096, math.nan, math.nan),
    ])
    text = bench_kernels.goal(rows, 32768)
    assert "fwd: sliding-window kernel at 70% of dense flash TFLOP/s (meets >= 60%)" in text
    assert "fwd_bwd: sliding-window kernel at 50% of dense flash TFLOP/s (misses >= 60%)" in text
    assert "fwd: causal kernel 1.50x the speed of cuDNN's sliding window (beats it)" in text
    assert "fwd_bwd: causal kernel 0.50x the speed of cuDNN's sliding window (does not beat it)" in text
    assert "fwd: causal FAVOR+ kernel at 1.25x bidirectional's time (meets <= 1.5x)" in text
    assert "fwd_bwd: causal FAVOR+ kernel at 2.00x bidirectional's time (misses <= 1.5x)" in text
    assert "not measured" not in bench_kernels.goal(rows, 32768)
    assert bench_kernels.goal(rows, 4096).count("not measured") == 3


def test_the_goal_length_is_measured_first():
    assert bench_kernels.measurement_order([4096, 8192, 32768, 65536]) == [32768, 4096, 8192, 65536]
    assert bench_kernels.measurement_order([4096, 8192]) == [4096, 8192]


@pytest.mark.parametrize("budget", ["8", "0"])
def test_smoke_run_writes_every_row(tmp_path, budget):
    ops = "pallas_sliding_window,pallas_favor_causal"
    result = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, "bench_kernels.py"), "--smoke", "--ops", ops,
         "--budget-minutes", budget, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "bench_kernels.csv") as f:
        rows = list(csv.DictReader(f))
    # dense flash is always added: it is the yardstick of every fraction.
    assert [(r["op"], r["seq"]) for r in rows] == [
        (op, seq) for seq in ("256", "512") for op in ("dense_flash", *ops.split(","))
    ]
    assert (tmp_path / "bench_kernels.png").stat().st_size > 0
    for r in rows:
        if budget == "0":
            assert r["note"].startswith("not run: --budget-minutes 0 spent") and r["fwd_ms"] == "nan"
        else:
            assert float(r["fwd_ms"]) > 0 and float(r["fwd_bwd_ms"]) > 0, r
            assert not r["note"].startswith("failed"), r
