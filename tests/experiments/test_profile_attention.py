"""`experiments/profile_attention.py` runs end to end on a CPU: per-operation times of an op's
forward+backward from the profiler's trace, its matrix products found in the compiled HLO with
their FLOPs. The times of the run mean nothing; the FLOP count is checked against the band's own."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

from longjax.attention import band

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
SEQ, HEADS, HEAD_DIM, WINDOW = 1024, 12, 64, 256  # bench_attention's op at a short sequence


def test_profile_counts_the_band_products_and_writes_csv_and_png(tmp_path):
    # A subprocess: the script sets XLA_FLAGS before JAX starts, which this process has done already.
    done = subprocess.run(
        [sys.executable, "experiments/profile_attention.py", "--ops", "sliding", "--seq", str(SEQ),
         "--repeats", "1", "--top", "5", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "experiments")])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / f"profile_sliding_window_w_{WINDOW}_{SEQ}"
    assert (tmp_path / (stem.name + ".png")).stat().st_size > 0
    with open(tmp_path / (stem.name + ".csv")) as f:
        rows = list(csv.DictReader(f))
    assert {row["kind"] for row in rows} == {"product", "other"}
    assert math.isclose(sum(float(row["share"]) for row in rows), 1.0, rel_tol=1e-6)
    products = [row for row in rows if row["kind"] == "product"]
    # The band's 7 products a query block (scores and output forward; scores again, output gradient,
    # dq, dk, dv backward), each 2 x heads x block x span x head_dim FLOPs, over every block.
    block = band.choose_block_size(SEQ, WINDOW, WINDOW)
    geometry = band._Geometry.of(SEQ, WINDOW, WINDOW, block)
    expected = 7 * 2 * HEADS * geometry.num_blocks * block * geometry.span * HEAD_DIM
    counted = sum(float(row["gflops"]) * 1e9 * float(row["ms"]) * 1e-3 for row in products)
    assert math.isclose(counted, expected, rel_tol=1e-6)
    assert sum(int(row["calls"]) for row in products) == 7 * geometry.num_blocks
    assert "products' share" in done.stdout
