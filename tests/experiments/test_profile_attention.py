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
sys.path.insert(0, os.path.join(REPO, "experiments"))

import profile_attention  # noqa: E402
SEQ, HEADS, HEAD_DIM, WINDOW = 1024, 12, 64, 256  # bench_attention's op at a short sequence


def test_profile_counts_the_band_products_and_writes_csv_and_png(tmp_path):
    # A subprocess: the script sets XLA_FLAGS before JAX starts, which this process has done already.
    done = subprocess.run(
        [sys.executable, "experiments/profile_attention.py", "--ops", "sliding", "--seq", str(SEQ),
         "--repeats", "2", "--top", "5", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "experiments")])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / f"profile_sliding_window_w_{WINDOW}_{SEQ}"
    assert (tmp_path / (stem.name + ".png")).stat().st_size > 0
    with open(tmp_path / (stem.name + ".csv")) as f:
        rows = list(csv.DictReader(f))
    assert {row["kind"] for row in rows} == {"product", "other"}
    # Operations of the compiled module only: no control flow, no host spans ("PjitFunction(...)").
    assert not any(row["operation"].startswith("while") or "(" in row["operation"] for row in rows)
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
    # The summary's bound: the useful FLOPs bench_attention.py counts (513 keys a query), over the
    # time some product ran, which is no more than their summed time and no less than the longest.
    with open(tmp_path / f"profile_summary_{SEQ}.csv") as f:
        (summary,) = list(csv.DictReader(f))
    useful = 3.5 * 4 * SEQ * (2 * WINDOW + 1) * HEAD_DIM * HEADS
    assert math.isclose(float(summary["computed_per_useful"]), expected / useful, rel_tol=1e-6)
    busy_ms = float(summary["product_busy_ms"])
    assert max(float(row["ms"]) for row in products) <= busy_ms * (1 + 1e-9)
    assert busy_ms <= sum(float(row["ms"]) for row in products) * (1 + 1e-9)
    assert math.isclose(float(summary["bound_of_matmul"]),
                        useful / (busy_ms * 1e-3) / (float(summary["matmul_gflops"]) * 1e9), rel_tol=1e-6)


def test_busy_time_is_the_union_of_the_intervals():
    assert profile_attention._busy_seconds([]) == 0.0
    assert profile_attention._busy_seconds([(5.0, 15.0), (0.0, 10.0), (20.0, 25.0), (21.0, 22.0)]) == 20.0
    assert profile_attention._busy_seconds([(0.0, 1.0), (1.0, 2.0)]) == 2.0


HLO = """HloModule m

%wrapped_tanh_computation (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4]{1,0} parameter(0)
  ROOT %tanh.1 = f32[4,4]{1,0} tanh(%p)
}

%fused_dot (a: f32[8,16], b: f32[3,16,32]) -> (f32[3,8,32], f32[3,8,32]) {
  %a = f32[3,8,16]{2,1,0} parameter(0)
  %b = f32[3,16,32]{2,1,0} parameter(1)
  %d = f32[3,8,32]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  ROOT %pair = (f32[3,8,32]{2,1,0}, f32[3,8,32]{2,1,0}) tuple(%d, %d)
}

%body (s: f32[8,16]) -> f32[8,16] {
  %s = f32[8,16]{1,0} parameter(0)
  ROOT %inner = f32[8,16]{1,0} dot(%s, %s), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.3 (x: f32[8,16], y: f32[16,32], z: f32[4,4]) -> f32[8,32] {
  %x = f32[8,16]{1,0} parameter(0)
  %y = f32[16,32]{1,0} parameter(1)
  %z = f32[4,4]{1,0} parameter(2)
  %wrapped_tanh = f32[4,4]{1,0} fusion(%z), kind=kLoop, calls=%wrapped_tanh_computation
  %dot.3 = f32[8,32]{1,0} dot(%x, %y), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ynn = (f32[3,8,32]{2,1,0}, f32[3,8,32]{2,1,0}) fusion(%x, %y), kind=kCustom, calls=%fused_dot
  %loop = f32[8,16]{1,0} while(%x), condition=%cond, body=%body
  ROOT %out = f32[8,32]{1,0} add(%dot.3, %dot.3)
}
"""


def test_products_and_their_flops_come_from_the_dots_in_the_hlo():
    # A dot in the entry computation is charged to itself, not to the computation printed before
    # it; a fusion with a tuple result is a product; a while loop is control flow, not a product.
    opcodes, products = profile_attention._hlo_operations(HLO)
    assert products == {"dot.3": 2 * 8 * 32 * 16, "ynn": 2 * 3 * 8 * 32 * 16, "d": 2 * 3 * 8 * 32 * 16,
                        "inner": 2 * 8 * 16 * 16}
    assert opcodes["loop"] == "while" and opcodes["wrapped_tanh"] == "fusion"
