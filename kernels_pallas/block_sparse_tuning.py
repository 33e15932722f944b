"""Block lengths of the Triton block-sparse flash kernels, chosen per pattern by a cost model.

A kernel block that straddles a narrow band computes many scores the band
masks out: with 32-64 keys each side (the char LM's lower layers), the
FlashAttention-like tiles (forward 128 x 64, backward 64 x 64) compute 3-8
times the allowed (query, key) pairs. Smaller blocks waste less but visit
more, and each visit reloads its key (or query) tiles and pays the loop's
fixed steps; each program pays a prologue and an epilogue. `choose_gpu_blocks`
walks candidate block lengths, asks the pattern for the layout of each (so
the visit counts are the kernel's own, BigBird's random blocks included) and
keeps the cheapest under `GpuCostModel`, separately for the forward kernel
and for the backward pair (dq and dk/dv share their blocks).

The model is a per-SM roofline over one (batch, head) of the call:

    visit   = max(matmul MACs / tensor-core rate(rows) + scores * score cycles,
                  tile bytes / load bandwidth) + visit cycles
    program = program cycles + (its q/out-style tiles) bytes / load bandwidth
    kernel  = sum over visits + sum over programs

Its constants are estimates for an H100 SXM from public figures (peak rates,
FlashAttention-3's exp-throughput argument), not GPU measurements: no GPU was
available when they were set. They only rank candidates, so what matters is
their ratios; `experiments/bench_kernels.py --pallas-blocks` measures a given
choice on a GPU. Ignored: wave quantisation over the SMs, occupancy, load
imbalance between long and short rows, and the padded tail, which the
candidates' layouts already count as empty programs.

Imports nothing of longjax: a pattern is anything with `layout` and
`padded_len` (`block_sparse_flash.Pattern`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kernels_pallas import block_layout

# Candidate lengths: powers of two from tl.dot's minimum up to the tiles of the former fixed defaults
# (forward 128 x 64, backward 64 x 64), whose shared memory, registers and spills `gpu_resources` checks
# on sm_90; no candidate tile is larger than those in either dimension.
GPU_CANDIDATES = {
    "block_q": (16, 32, 64, 128),
    "block_k": (16, 32, 64),
    "block_q_bwd": (16, 32, 64),
    "block_k_bwd": (16, 32, 64),
}


@dataclasses.dataclass(frozen=True)
class GpuCostModel:
    """Estimated costs of the Triton kernels on one H100 SM, in SM clock cycles.

    Estimates from public peak figures, not measurements (see the module docstring).

    Attributes:
      mma_macs_per_cycle: bf16 tensor-core multiply-adds per cycle per SM at peak
        (989 dense TFLOP/s / 132 SMs / 1.83 GHz / 2).
      wgmma_rows: rows (the dot's M) from which Triton emits Hopper's wgmma;
        fewer rows get Ampere-style mma.sync.
      small_rows_efficiency: mma.sync's fraction of the wgmma rate.
      score_cycles: CUDA-core and SFU work per score element beyond the
        matmuls: one exp2 at 16 per cycle and ~6 float32 ops (scale, mask,
        max, subtract, sum, cast) at 128 per cycle; the backward's per-element
        work (exp2, ds) is of the same size.
      load_bytes_per_cycle: L2-to-SM bandwidth per SM (~7.7 TB/s over 132 SMs);
        the tiles a visit loads are shared with neighbouring programs, so they
        come mostly from L2, and the software pipeline overlaps them with the
        visit's compute (hence the max).
      visit_cycles: a visit's fixed steps: the layout code and key-block flag
        loads, the branch on them, the loop and pipeline bookkeeping.
      program_cycles: a program's fixed prologue and epilogue latency (launch,
        first loads, the row's statistics, the stores) not hidden by other programs.
    """

    mma_macs_per_cycle: float = 2048.0
    wgmma_rows: int = 64
    small_rows_efficiency: float = 0.5
    score_cycles: float = 1 / 16 + 6 / 128
    load_bytes_per_cycle: float = 32.0
    visit_cycles: float = 64.0
    program_cycles: float = 500.0

    def _visit(self, rows: int, cols: int, width: int, matmuls: int, load_bytes: float) -> float:
        rate = self.mma_macs_per_cycle * (1.0 if rows >= self.wgmma_rows else self.small_rows_efficiency)
        compute = matmuls * rows * cols * width / rate + rows * cols * self.score_cycles
        return max(compute, load_bytes / self.load_bytes_per_cycle) + self.visit_cycles

    def _program(self, tile_bytes: float) -> float:
        return self.program_cycles + tile_bytes / self.load_bytes_per_cycle

    def forward(self, layout: block_layout.BlockLayout, width: int, itemsize: int) -> float:
        """Cycles of the forward kernel per (batch, head): q k^T and p v per visit, K and V tiles loaded."""
        bq, bk = layout.block_q, layout.block_k
        visit = self._visit(bq, bk, width, matmuls=2, load_bytes=2 * bk * width * itemsize)
        program = self._program(2 * bq * width * itemsize + 4 * bq)  # q in; out and lse out
        return visits_per_head(layout) * visit + layout.num_q_blocks * program

    def backward(self, layout: block_layout.BlockLayout, width: int, itemsize: int) -> float:
        """Cycles of the dq and dk/dv kernels per (batch, head).

        dq: one program per query block, q k^T, do v^T and ds k per visit, K and
        V tiles loaded. dk/dv: one program per key block (the transposed
        layout, scores `[block_k, block_q]`), k q^T, v do^T, p^T do and ds^T q
        per visit, q and do tiles and two float32 row vectors loaded.
        """
        bq, bk = layout.block_q, layout.block_k
        visits = visits_per_head(layout)
        dq = visits * self._visit(bq, bk, width, 3, 2 * bk * width * itemsize) + layout.num_q_blocks * self._program(
            3 * bq * width * itemsize + 8 * bq
        )
        dkv = visits * self._visit(bk, bq, width, 4, 2 * bq * width * itemsize + 8 * bq) + (
            layout.num_k_blocks * self._program(4 * bk * width * itemsize)
        )
        return dq + dkv


GPU_COST = GpuCostModel()


def visits_per_head(layout: block_layout.BlockLayout) -> float:
    """Visited block pairs per attention head (layout heads averaged: BigBird's random blocks differ by head)."""
    return float(layout.offsets[:, -1].sum()) / layout.layout_heads


def computed_pairs(layout: block_layout.BlockLayout) -> float:
    """(query, key) scores the kernel computes per head: visited block pairs x block_q x block_k."""
    return visits_per_head(layout) * layout.block_q * layout.block_k


def _layout(pattern, block_q: int, block_k: int) -> block_layout.BlockLayout:
    return pattern.layout(block_q, block_k, pattern.padded_len((block_q, block_k)))


def _cheapest(pattern, fit, names, requested, cost) -> dict[str, int]:
    """The fitted (query, key) pair for `names` of least `cost(layout)`; ties go to the larger tile."""
    options = []
    for name in names:
        if requested[name] is not None:
            options.append([fit(name, requested[name])])
            continue
        fitted = set()
        for length in GPU_CANDIDATES[name]:
            try:
                fitted.add(fit(name, length))
            except NotImplementedError:
                pass  # a candidate the pattern cannot take (a block that straddles its slots): not a choice
        if not fitted:
            raise NotImplementedError(f"the pattern takes none of the candidate {name} lengths {GPU_CANDIDATES[name]}")
        options.append(sorted(fitted))
    best = min(
        ((cost(_layout(pattern, bq, bk)), -bq * bk, -bq), bq, bk) for bq in options[0] for bk in options[1]
    )
    return dict(zip(names, best[1:]))


def choose_gpu_blocks(
    pattern, fit: Callable[[str, int], int], *, width: int, itemsize: int, requested: dict[str, int | None],
    model: GpuCostModel = GPU_COST,
) -> dict[str, int]:
    """The four block lengths of a Triton call, each requested one kept and the others chosen by `model`.

    Args:
      pattern: a `block_sparse_flash.Pattern`.
      fit: `(name, length) -> fitted length`, the pattern's fit for the call's
        lowering (a band shorter than a block shortens it; BigBird's slot caps it).
      width: the kernels' head tile width (`block_sparse_gpu.kernel_head_dim`).
      itemsize: bytes per element of q, k and v as loaded.
      requested: `{'block_q' | 'block_k' | 'block_q_bwd' | 'block_k_bwd': length or None}`;
        None: chosen among `GPU_CANDIDATES`, fitted.

    Returns:
      The four fitted lengths, by name.
    """
    forward = _cheapest(
        pattern, fit, ("block_q", "block_k"), requested, lambda layout: model.forward(layout, width, itemsize)
    )
    backward = _cheapest(
        pattern, fit, ("block_q_bwd", "block_k_bwd"), requested,
        lambda layout: model.backward(layout, width, itemsize),
    )
    return forward | backward
