"""The cost model that chooses the Triton block-sparse kernels' block lengths (`block_sparse_tuning`).

Nothing runs on a GPU: the choice is made from the patterns' layouts, and
the results stay exact whatever it is (the battery run below, interpreted).
`test_block_sparse_gpu_resources.py` compiles chosen tiles for sm_90.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import block_sparse_flash as block_sparse_kernels
from kernels_pallas import block_sparse_tuning
from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes
from longjax.attention import bigbird_random_layout, masks, sliding_window_attention, specs
from longjax.attention.kernel_layouts import BandPattern, BigBirdPattern
from tests.attention import battery

SEQ = 2048
# The former fixed defaults: the reference point of the work fractions.
FIXED = GpuBlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)


def _blocks(pattern, block_sizes=GpuBlockSizes(), head_dim=64, dtype=jnp.bfloat16):
    return block_sparse_kernels.call_block_sizes(pattern, block_sizes, head_dim=head_dim, dtype=dtype)


def _work_fractions(window: int, blocks: GpuBlockSizes) -> tuple[float, float]:
    """Allowed (query, key) pairs over computed scores, forward and backward, for a band of `window` each side."""
    pattern = BandPattern(seq_len=SEQ, left=window, right=window)
    useful = int(masks.dilated_window_mask(SEQ, left=window, right=window).sum())
    padded = pattern.padded_len((blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd))
    forward = pattern.layout(blocks.block_q, blocks.block_k, padded)
    backward = pattern.layout(blocks.block_q_bwd, blocks.block_k_bwd, padded)
    return useful / block_sparse_tuning.computed_pairs(forward), useful / block_sparse_tuning.computed_pairs(backward)


def test_narrow_windows_get_smaller_blocks():
    tile = lambda b: (b.block_q * b.block_k, b.block_q_bwd * b.block_k_bwd)
    narrow, wide = (_blocks(BandPattern(SEQ, w, w)) for w in (32, 256))
    assert tile(narrow)[0] < tile(wide)[0] and tile(narrow)[1] < tile(wide)[1], (narrow, wide)


@pytest.mark.parametrize(
    "window, forward_gain, backward_gain",
    # With these constants (bf16, head_dim 64) the allowed share of the computed scores goes, window 16:
    # forward 0.133 -> 0.346 (x2.61), backward 0.175 -> 0.261 (x1.49); window 32: forward 0.260 -> 0.512
    # (x1.97), backward 0.343 -> 0.512 (x1.49). The blocks: (64, 16 | 32, 64) and (64, 32 | 32, 64).
    [(16, 2.5, 1.45), (32, 1.9, 1.45)],
)
def test_narrow_windows_waste_less_work(window, forward_gain, backward_gain):
    fixed = _work_fractions(window, FIXED)
    chosen = _work_fractions(window, _blocks(BandPattern(SEQ, window, window)))
    assert chosen[0] >= forward_gain * fixed[0] and chosen[1] >= backward_gain * fixed[1], (fixed, chosen)


def test_wide_windows_keep_flash_sized_blocks():
    # A wide band wastes little with any block: the model keeps the largest tiles the candidates
    # offer (within one step), whose per-visit and per-program costs are the lowest.
    for window in (256, 512):
        b = _blocks(BandPattern(SEQ, window, window))
        assert b.block_q >= 64 and b.block_k == 64 and b.block_q_bwd == b.block_k_bwd == 64, (window, b)


def test_bigbird_blocks_fill_the_slot():
    # Every pair of a BigBird block pair is allowed: smaller kernel blocks would only add visits.
    layout = bigbird_random_layout(32, 2, 2, global_blocks=(0,), causal=False, seed=0)
    spec = specs.BlockSparseSpec(
        block_size=64, num_blocks=32, window_radius=1, global_blocks=(0,), random_layout=layout, causal=False
    )
    assert _blocks(BigBirdPattern(spec, seq_len=SEQ, slot=64)) == GpuBlockSizes(64, 64, 64, 64)


def test_given_lengths_are_kept():
    pattern = BandPattern(SEQ, 32, 32)
    assert _blocks(pattern, FIXED) == FIXED
    chosen = _blocks(pattern, GpuBlockSizes(block_k=16, num_warps=4))
    assert chosen.block_k == 16 and chosen.num_warps == 4
    assert all(getattr(chosen, n) in block_sparse_tuning.GPU_CANDIDATES[n] for n in ("block_q", "block_q_bwd"))
    # A given length is still fitted to the pattern: no block beyond a short sequence.
    assert _blocks(BandPattern(40, 4, 4), GpuBlockSizes(128, 64, 64, 64)) == GpuBlockSizes(64, 64, 64, 64)
    # The Mosaic lowering has no cost model: its (complete) lengths are used as they are.
    assert _blocks(pattern, TpuBlockSizes()) == TpuBlockSizes()


def test_choice_follows_the_cost_model():
    # The chosen pair is the cheapest under the model among all candidate pairs.
    pattern, model = BandPattern(SEQ, 32, 32), block_sparse_tuning.GPU_COST
    chosen = _blocks(pattern)
    cost = lambda bq, bk: model.forward(pattern.layout(bq, bk, pattern.padded_len((bq, bk))), 64, 2)
    best = cost(chosen.block_q, chosen.block_k)
    candidates = block_sparse_tuning.GPU_CANDIDATES
    assert all(best <= cost(bq, bk) for bq in candidates["block_q"] for bk in candidates["block_k"])
    assert best < cost(FIXED.block_q, FIXED.block_k)


def test_chosen_blocks_are_exact():
    # block_sizes=None on a CPU host, interpreted: the GPU kernels with the chosen lengths, which for
    # this narrow band are several blocks per row with masked (partial) and full visits.
    batch, seq, heads, dim = 2, 160, 2, 16
    pattern = BandPattern(seq, 5, 5)
    chosen = block_sparse_kernels.call_block_sizes(
        pattern, GpuBlockSizes(), head_dim=dim, dtype=jnp.float32, interpret=True
    )
    assert chosen.block_k < 64 and chosen.block_q_bwd < 64, chosen
    q, k, v = battery.random_inputs(11, (batch, seq, heads, dim), jnp.float32, 3)
    padding_mask = battery.padding_mask(batch, seq, (seq, 131))
    run = lambda impl, **kw: lambda q, k, v: sliding_window_attention(
        q, k, v, window=5, padding_mask=padding_mask, impl=impl, **kw
    )
    battery.assert_matches_reference(
        run("pallas", interpret=True), run("reference"), (q, k, v), dot_dtype=jnp.bfloat16
    )
    np.testing.assert_equal(block_sparse_kernels.default_block_sizes(None, interpret=True), GpuBlockSizes())
