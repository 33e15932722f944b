"""Shared memory, registers, spills and tensor-core use of every Pallas GPU kernel, compiled for sm_90 here.

Exports each op's gradient program for CUDA (`tests/kernels/gpu_cases.py`; the
`*_relative` ops with Transformer-XL positions computed in the kernels),
compiles every Triton kernel in it with the pip `triton` (the `gpu-check`
extra) and `ptxas -v`, and prints one row per kernel; `--csv` writes them.
Runs on a CPU host in a few minutes:

    python experiments/kernel_resources.py [--ops band,favor_causal] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kernels_pallas import gpu_resources  # noqa: E402
from tests.kernels import gpu_cases  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(gpu_cases.OPS + tuple(gpu_cases.RELATIVE_OPS)))
    parser.add_argument("--dtypes", default=",".join(gpu_cases.DTYPES))
    parser.add_argument("--head-dims", default=",".join(map(str, gpu_cases.HEAD_DIMS)))
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    rows = []
    header = f"{'op':24} {'dtype':5} {'d':>4} {'kernel':36} {'warps':>5} {'programs':>8} {'shared B':>9} " \
             f"{'regs':>4} {'spill st':>8} {'tc dots':>7} {'fma dots':>8}"
    print(f"seq {gpu_cases.SEQ}, {gpu_cases.HEADS} heads, {gpu_cases.FEATURES} features; "
          f"Hopper limit {gpu_resources.HOPPER_MAX_SHARED:,} B shared memory per block")
    print(header)
    start = time.time()
    for op in args.ops.split(","):
        for dtype in args.dtypes.split(","):
            for head_dim in map(int, args.head_dims.split(",")):
                seen = set()
                for kernel in gpu_resources.triton_kernels(gpu_cases.exported_gradient(op, dtype, head_dim)):
                    if kernel.ir in seen:
                        continue
                    seen.add(kernel.ir)
                    r = gpu_resources.compile_for_hopper(kernel)
                    row = dict(op=op, dtype=dtype, head_dim=head_dim, kernel=r.name, num_warps=r.num_warps,
                               programs=r.programs, shared_bytes=r.shared_bytes, registers=r.registers,
                               spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                               tensor_core_dots=r.tensor_core_dots, fma_dots=r.fma_dots,
                               problems="; ".join(r.problems()))
                    rows.append(row)
                    flag = "  <-- " + row["problems"] if row["problems"] else ""
                    print(f"{op:24} {dtype:5} {head_dim:>4} {r.name[:36]:36} {r.num_warps:>5} {r.programs:>8} "
                          f"{r.shared_bytes:>9,} {r.registers:>4} {r.spill_stores:>8} {r.tensor_core_dots:>7} "
                          f"{r.fma_dots:>8}{flag}", flush=True)
    print(f"{len(rows)} kernels in {time.time() - start:.0f} s; "
          f"{sum(1 for r in rows if r['problems'])} with problems")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
