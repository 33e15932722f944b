"""The TPU kernels' scalar (SMEM) and vector (VMEM) memory at long sequences, computed from their layouts.

Nothing runs: `block_sparse_flash.tpu_footprints` reads the layouts' compacted
visit tables (scalar-prefetched whole into SMEM) and the kernels' block specs
and scratch (VMEM), and `tpu_footprint.CHIPS` holds the budgets (sources in
that module). A call over budget is refused before lowering, naming both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import block_layout, tpu_footprint
from kernels_pallas import block_sparse_flash as block_sparse_kernels
from kernels_pallas.block_sparse_flash import TpuBlockSizes
from longjax.attention import bigbird_random_layout, block_sparse_attention, sliding_window_attention, specs
from longjax.attention.kernel_layouts import BandPattern, BigBirdPattern

SEQ, HEADS, WINDOW, BIGBIRD_BLOCK = 131_072, 16, 256, 64


@functools.lru_cache(maxsize=None)
def _bigbird_pattern(seq, heads, causal):
    blocks = seq // BIGBIRD_BLOCK
    layout = bigbird_random_layout(blocks, heads, 3, global_blocks=(0, -1), causal=causal, seed=0)
    spec = specs.BlockSparseSpec(
        block_size=BIGBIRD_BLOCK, num_blocks=blocks, window_radius=1, global_blocks=(0, blocks - 1),
        random_layout=layout, causal=causal,
    )
    # On TPU a 64-token block sits in a 64-position slot (a multiple of 8); the default 128-position
    # kernel blocks span two slots.
    slot = block_sparse_kernels.allowed_block(BIGBIRD_BLOCK, TpuBlockSizes(), interpret=False)
    return BigBirdPattern(spec, seq_len=seq, slot=slot)


def _calls(pattern_name):
    """(pattern, kernel batch) of each kernel call the op makes for one example of SEQ tokens and HEADS heads."""
    if pattern_name == "band":
        return [(BandPattern(seq_len=SEQ, left=WINDOW, right=WINDOW), 1)]
    if pattern_name == "band_causal_dilated":
        # dilation (1, 1, 2, 2): one call per dilation; dilation 2 folds two subsequences into the batch.
        return [(BandPattern(seq_len=SEQ // d, left=WINDOW, right=0), d) for d in (1, 2)]
    return [(_bigbird_pattern(SEQ, HEADS, pattern_name == "bigbird_causal"), 1)]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("pattern_name", ["band", "band_causal_dilated", "bigbird", "bigbird_causal"])
def test_kernels_fit_v5e_and_v5p_at_128k_tokens(pattern_name, head_dim):
    report = []
    for pattern, batch in _calls(pattern_name):
        footprints = block_sparse_kernels.tpu_footprints(pattern, batch=batch, head_dim=head_dim, dtype=jnp.bfloat16)
        assert set(footprints) == {"forward", "dq", "dkv"}
        for kind, fp in footprints.items():
            assert fp.smem_bytes > 0 and fp.vmem_bytes > 0
            for chip in ("v5e", "v5p"):
                report += [f"{kind}: {p}" for p in fp.problems(tpu_footprint.CHIPS[chip])]
    assert not report, "\n".join(report)


def test_512_key_blocks_fit_v5e_and_v5p_at_128k_tokens():
    # Splash-style 512-key DMA blocks computed 128 keys at a time: ~1 MB forward, ~2.2 MB dk/dv.
    blocks = TpuBlockSizes(block_q=128, block_k=512, block_q_bwd=128, block_k_bwd=512)
    for pattern, batch in _calls("band") + _calls("band_causal_dilated"):
        fps = block_sparse_kernels.tpu_footprints(pattern, batch=batch, head_dim=128, dtype=jnp.bfloat16,
                                                  block_sizes=blocks)
        for fp in fps.values():
            assert not fp.problems(tpu_footprint.CHIPS["v5e"]) + fp.problems(tpu_footprint.CHIPS["v5p"])


def test_bigbird_tables_are_a_quarter_of_int32_ones():
    # int32 rows, cols and flags per visit would not fit the SMEM at 16 heads (~2.4 MB with the
    # global rows and columns in dense passes, ~3.9 MB with them in the layout); 3 B per visit do.
    pattern = _bigbird_pattern(SEQ, HEADS, False)
    layout = pattern.layout(BIGBIRD_BLOCK, BIGBIRD_BLOCK, pattern.padded_len((BIGBIRD_BLOCK,) * 4))
    rows, _, _ = layout.flattened()
    int32_bytes = 3 * rows.size * 4
    assert int32_bytes > 2 * tpu_footprint.SMEM_BUDGET
    tables = layout.visit_tables()
    assert tables.row_offset.dtype == np.int8 and tables.codes.dtype == np.int16
    assert tables.row_base.dtype == np.int16  # 2,048 query blocks
    # A quarter, but for padding each head to whole row chunks and the chunk bases.
    assert tables.nbytes < 0.26 * int32_bytes and tables.nbytes < tpu_footprint.SMEM_BUDGET


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_128_tiles_at_128k_tokens(causal):
    # 64-token blocks in 128 x 128 tiles (the defaults) against 64 x 64 ones: a quarter fewer
    # visits (random blocks rarely share a tile, so not the 4x of the window), each with an int8
    # slot-pair mask; tables of ~0.55 MB, within the SMEM of v5e and v5p.
    pattern = _bigbird_pattern(SEQ, HEADS, causal)
    tiles = {}
    for block in (64, 128):
        blocks = TpuBlockSizes(block, block, block, block)
        config = block_sparse_kernels._make_config(pattern, blocks, False, 1.0, 64, jnp.bfloat16)
        fps = block_sparse_kernels.tpu_footprints(pattern, batch=1, head_dim=64, dtype=jnp.bfloat16, block_sizes=blocks)
        tiles[block] = config.forward_layout, max(fp.smem_bytes for fp in fps.values())
    (narrow, _), (wide, smem) = tiles[64], tiles[128]
    assert (narrow.block_q, narrow.block_k, narrow.sub_block) == (64, 64, None)
    assert (wide.block_q, wide.block_k, wide.sub_block) == (128, 128, 64)
    assert wide.total_entries() < 0.8 * narrow.total_entries()
    assert wide.visit_tables().sub_masks.dtype == np.int8 and wide.visit_tables().codes.dtype == np.int16
    assert smem < 0.6 * tpu_footprint.SMEM_BUDGET


def test_smallest_int():
    for top, dtype in ((0, np.int8), (127, np.int8), (128, np.int16), (32767, np.int16), (32768, np.int32)):
        assert block_layout.smallest_int(np.array([0, top], np.int64)).dtype == dtype
    with pytest.raises(ValueError, match="tables hold values in"):
        block_layout.smallest_int(np.array([-1]))


def _decode(tables: block_layout.VisitTables, head: int):
    """(rows, cols, partial, compute, first, last) of one head, read as the kernels read the tables."""
    i = head * tables.length + np.arange(tables.length)
    rows = tables.row_base[i // block_layout.ROW_CHUNK].astype(np.int64) + tables.row_offset[i]
    codes = tables.codes[i].astype(np.int64)
    first = np.r_[True, rows[1:] != rows[:-1]]
    last = np.r_[rows[1:] != rows[:-1], True]
    partial = (codes & block_layout.CODE_PARTIAL) != 0
    compute = (codes & block_layout.CODE_COMPUTE) != 0
    return rows, codes >> block_layout.CODE_SHIFT, partial, compute, first, last


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("blocks, sub_mask_dtype", [((32, 64), None), ((128, 256), np.int8), ((256, 256), np.int16)])
def test_compact_tables_list_the_layouts_visits(transposed, blocks, sub_mask_dtype):
    # Per-head layouts with empty rows (causal BigBird's first rows see few blocks) and uneven heads;
    # kernel blocks within a slot, or spanning 2 x 4 (8-bit masks, the sign bit used) or 4 x 4 slots.
    pattern = _bigbird_pattern(2048, 3, True)
    layout = pattern.layout(*blocks, pattern.padded_len(blocks))
    tables = layout.visit_tables(transposed)
    assert tables.length % block_layout.ROW_CHUNK == 0
    bits = layout.sub_blocks_q * layout.sub_blocks_k
    assert (tables.sub_masks.dtype if bits > 1 else None) == sub_mask_dtype
    n_rows = layout.num_k_blocks if transposed else layout.num_q_blocks
    for head in range(layout.layout_heads):
        rows, cols, partial, compute, first, last = _decode(tables, head)
        # The masks as the kernels read them: sign-extended to int32, then the low bits.
        masks = tables.sub_masks[head * tables.length + np.arange(tables.length)] if bits > 1 else None
        masks = np.ones(tables.length, np.int64) if masks is None else masks.astype(np.int32) & ((1 << bits) - 1)
        got = sorted(zip(rows[compute].tolist(), cols[compute].tolist(), partial[compute].tolist(),
                         masks[compute].tolist()))
        r, c, p = layout.entries(head, transposed)
        m = layout.entry_sub_masks(head, transposed)
        assert got == sorted(zip(r.tolist(), c.tolist(), (p != 0).tolist(), m.tolist()))
        # Every row starts once and ends once, in order: its accumulators are set up and written once.
        np.testing.assert_array_equal(rows[first], np.arange(n_rows))
        np.testing.assert_array_equal(rows[last], np.arange(n_rows))


def test_vmem_tiles_pad_to_sublanes_and_lanes():
    assert tpu_footprint.vmem_tile_bytes((128, 1), jnp.float32) == 128 * 128 * 4
    assert tpu_footprint.vmem_tile_bytes((128, 64), jnp.bfloat16) == 128 * 128 * 2
    assert tpu_footprint.vmem_tile_bytes((8, 128), jnp.bfloat16) == 16 * 128 * 2
    assert tpu_footprint.vmem_tile_bytes((1, 128), jnp.int32) == 8 * 128 * 4


def test_row_statistics_are_lane_dense():
    # The backward reads the log-sum-exp and row terms as [8, block_q] rows, not [block_q, 1]
    # columns that pad each value to a 128-lane row: at block_q 128, 4 KiB per buffer, not 64 KiB.
    pattern = BandPattern(seq_len=4096, left=WINDOW, right=WINDOW)
    fps = block_sparse_kernels.tpu_footprints(pattern, batch=1, head_dim=128, dtype=jnp.bfloat16)
    tile = lambda shape, dtype: tpu_footprint.vmem_tile_bytes(shape, dtype)
    blocks = 2 * 3 * tile((128, 128), jnp.bfloat16)  # q, k, v
    # dq: + do, valid keys (8, 128) int32 and two (8, 128) float32 row-term blocks, double-buffered; dq out; scratch.
    dq = blocks + 2 * tile((128, 128), jnp.bfloat16) + 2 * 3 * tile((8, 128), jnp.float32)
    dq += 2 * tile((128, 128), jnp.bfloat16) + tile((128, 128), jnp.float32)
    assert fps["dq"].vmem_bytes == dq


def test_over_smem_budget_is_refused_before_lowering():
    # BigBird with 64-token blocks at 128K tokens and 32 heads: ~2 MB of visit tables.
    seq, heads = SEQ, 32
    layout = bigbird_random_layout(seq // BIGBIRD_BLOCK, heads, 3, seed=0)
    q = jax.ShapeDtypeStruct((1, seq, heads, 64), jnp.bfloat16)
    fn = lambda q: block_sparse_attention(
        q, q, q, block_size=BIGBIRD_BLOCK, random_layout=layout, impl="pallas", interpret=False,
        block_sizes=TpuBlockSizes(),
    )
    with pytest.raises(ValueError, match=r"block_sparse_flash_fwd: .* needs [\d,]+ B of TPU scalar memory \(SMEM\).*"
                                         r"over the 1,048,576 B budget"):
        jax.eval_shape(fn, q)


def test_over_vmem_budget_is_refused_before_lowering():
    # 4096-long blocks: forward buffers and scratch of ~20 MB, over v5e's 16 MiB scoped limit.
    q = jax.ShapeDtypeStruct((1, 8192, 1, 128), jnp.bfloat16)
    fn = lambda q: sliding_window_attention(
        q, q, q, window=256, impl="pallas", interpret=False, block_sizes=TpuBlockSizes(4096, 4096, 128, 128)
    )
    with pytest.raises(ValueError, match=r"needs [\d,]+ B of TPU vector memory \(VMEM\).*over the 16,777,216 B budget"):
        jax.eval_shape(fn, q)


def test_a_banded_bias_adds_its_row_blocks():
    # Relative positions on the Mosaic kernels: the forward and dk/dv kernels read a [block, 640]
    # float32 block of the 513-column bias (window 256 a side, whole lanes); dq reads one and
    # writes its gradient. Each is double-buffered.
    pattern = BandPattern(seq_len=4096, left=256, right=256)
    plain = block_sparse_kernels.tpu_footprints(pattern, batch=1, head_dim=64, dtype=jnp.bfloat16)
    with_bias = block_sparse_kernels.tpu_footprints(
        pattern, batch=1, head_dim=64, dtype=jnp.bfloat16, bias_width=513
    )
    rows = 2 * tpu_footprint.vmem_tile_bytes((128, 640), jnp.float32)
    extra = {kind: with_bias[kind].vmem_bytes - plain[kind].vmem_bytes for kind in plain}
    assert extra == {"forward": rows, "dq": 2 * rows, "dkv": rows}
    assert all(fp.vmem_bytes <= tpu_footprint.VMEM_BUDGET for fp in with_bias.values())


def test_a_per_visit_bias_adds_query_rows_and_a_key_slot_table_and_fits_at_128k_tokens():
    # BigBird's relative positions on the Mosaic kernels, 64-token blocks two to a 128-position
    # tile: every kernel reads the visited query block's [128, 384] float32 rows of the per-visit
    # bias (6 entries of 64 columns), double-buffered, dq writes their gradient too, and each walk
    # scalar-prefetches the key slot of every entry of every query block (int16: 16 heads x 2048
    # blocks x 6 entries), not a table per visit. At 128K tokens and 16 heads that is ~0.99 MB of
    # SMEM, within v5e's and v5p's 1 MiB.
    pattern = _bigbird_pattern(SEQ, HEADS, False)
    plain = block_sparse_kernels.tpu_footprints(pattern, batch=1, head_dim=64, dtype=jnp.bfloat16)
    with_bias = block_sparse_kernels.tpu_footprints(
        pattern, batch=1, head_dim=64, dtype=jnp.bfloat16, bias_width=pattern.visit_bias_width
    )
    assert pattern.visit_bias_width == 384
    rows = 2 * tpu_footprint.vmem_tile_bytes((128, 384), jnp.float32)
    assert {kind: with_bias[kind].vmem_bytes - plain[kind].vmem_bytes for kind in plain} == {
        "forward": rows, "dq": 2 * rows, "dkv": rows
    }
    for kind, fp in with_bias.items():
        assert fp.smem_bytes - plain[kind].smem_bytes == HEADS * (SEQ // BIGBIRD_BLOCK) * 6 * 2, kind
        assert not fp.problems(tpu_footprint.CHIPS["v5e"]) + fp.problems(tpu_footprint.CHIPS["v5p"]), kind
