"""`experiments/speed_memory_figures.py --smoke` runs end to end on a CPU and writes a row for every op and
length (Pallas rows skipped, with the reason), its CSV, PNG and table; its timings here mean nothing."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "experiments")
sys.path.insert(0, os.path.abspath(EXPERIMENTS))

import speed_memory_figures  # noqa: E402


def _row(op, impl, seq, status, seconds=math.nan):
    return dict(op=op, impl=impl, seq=seq, status=status, seconds=seconds)


def test_stopping_points_say_where_and_why_each_op_stopped():
    rows = [
        _row("dense", "reference", 512, "ok", 1.0),
        _row("dense", "reference", 1024, "stopped: plans 9.00 GB > budget 8.00 GB"),
        _row("identity", "none", 512, "ok", 1.0),
        _row("identity", "none", 1024, "ok", 1.0),
        _row("favor", "pallas", 512, speed_memory_figures.CPU_PALLAS),
    ]
    assert speed_memory_figures.stopping_points(rows, 1024).splitlines() == [
        "- dense/reference: longest measured 512; at 1,024: stopped: plans 9.00 GB > budget 8.00 GB",
        "- identity/none: longest measured 1,024; the ladder's end (1,024) reached",
        f"- favor/pallas: nothing measured; {speed_memory_figures.CPU_PALLAS}",
    ]


def test_an_op_stops_before_a_case_estimated_past_the_time_limit(monkeypatch):
    op = speed_memory_figures.Op("fake", "none", lambda: None)
    calls = []

    def measure(op, seq, *, repeats, budget_bytes):
        calls.append(seq)
        # A quadratic op: each doubling takes 4x the time a call, compiling 1 s at every length.
        return speed_memory_figures._row(op, seq, "ok", seconds=(seq / 512) ** 2, peak_bytes=1.0,
                                         compile_seconds=1.0)

    monkeypatch.setattr(speed_memory_figures, "measure", measure)
    rows = speed_memory_figures.run_op(op, [512, 1024, 2048, 4096], repeats=1, budget_bytes=1e9,
                                       case_seconds=30.0, fresh_process=False)
    # 1 + 2 x 1 s, then 1 + 2 x 4 s; 2048 is estimated at 1 + 2 x 16 = 33 s > 30 s: not run, and its row says why.
    assert calls == [512, 1024]
    assert [r["status"] for r in rows] == ["ok", "ok", "stopped: estimated 33 s for the case > --case-seconds 30"]


def test_smoke_run_writes_every_op_and_length(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, "speed_memory_figures.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "speed_memory.csv") as f:
        rows = list(csv.DictReader(f))
    ops = speed_memory_figures.OPS
    assert len(ops) == 11
    assert [(r["op"], r["impl"], r["seq"]) for r in rows] == [
        (op.op, op.impl, seq) for op in ops for seq in ("128", "256")
    ]
    for r in rows:
        if r["impl"] == "pallas":
            assert r["status"] == speed_memory_figures.CPU_PALLAS, r
            assert math.isnan(float(r["seconds"])) and math.isnan(float(r["peak_bytes"])), r
        else:
            assert r["status"] == "ok", r
            assert 0 < float(r["seconds"]) < 10, r
            # On a CPU the peak is XLA's plan: at least q, k, v and the cotangent's 4 x 128 x 12 x 64 x 4 bytes
            # (identity: v and the cotangent in, out and three gradients out).
            assert r["memory_source"] == "xla_memory_analysis", r
            assert float(r["peak_bytes"]) == float(r["planned_bytes"]) >= 2 * 128 * 12 * 64 * 4, r
    # Memory grows with the length for every measured op.
    peaks = {(r["op"], r["impl"], r["seq"]): float(r["peak_bytes"]) for r in rows if r["status"] == "ok"}
    assert all(peaks[(op, impl, "256")] > peaks[(op, impl, "128")] for op, impl, _ in peaks)
    assert (tmp_path / "speed_memory.png").stat().st_size > 0
    assert "| op | impl | seq | fwd+bwd ms |" in result.stdout
    assert "Where each op stopped:" in result.stdout
