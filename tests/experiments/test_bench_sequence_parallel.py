"""The sequence-parallel benchmark runs end to end at tiny sizes and writes its table, CSV and PNG."""

import csv
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_a_tiny_run_writes_every_row(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_sequence_parallel.py"), "--devices", "1,2",
         "--seqs", "256,512", "--repeats", "1", "--out", str(tmp_path)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "sequence_parallel.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["devices"], r["seq"]) for r in rows] == [("1", "256"), ("1", "512"), ("2", "256"), ("2", "512")]
    # Two devices each plan less than one device does for the same sequence.
    one = {r["seq"]: float(r["gb_per_device"]) for r in rows if r["devices"] == "1"}
    assert all(float(r["gb_per_device"]) < one[r["seq"]] for r in rows if r["devices"] == "2")
    assert (tmp_path / "sequence_parallel.png").stat().st_size > 0
    assert "longest trainable sequence" in done.stdout
