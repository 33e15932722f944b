"""The kernels' block layouts of each pattern against the exact masks of `longjax.attention.masks`.

The union of the visited blocks (full blocks whole, partial blocks through the
in-kernel band, written independently of the kernel in `layout_checks`) must
equal the pattern's dense mask, with every block pair visited at most once (a
repeat would count its keys twice), and the transposed and flattened forms
must list the same visits. BigBird's layout is the pattern's sparse part: with
its dense part (global rows and columns, computed outside the kernel) it must
make the mask, the two disjoint, whether kernel blocks split the slots or span
several (visits then masked by their slot pairs' bits).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes
from longjax.attention import arguments, bigbird_random_layout, block_sparse, kernel_layouts, masks, specs
from tests.kernels.layout_checks import bigbird_dense_part, check_transposed_and_flattened, visited

_BLOCKS = st.sampled_from([1, 2, 4, 8, 16, 24])


@settings(max_examples=80)
@given(seq=st.integers(1, 70), left=st.integers(0, 40), right=st.integers(0, 40), block_q=_BLOCKS, block_k=_BLOCKS)
def test_band_layout_matches_mask(seq, left, right, block_q, block_k):
    layout = kernel_layouts.band_layout(seq, left=left, right=right, block_q=block_q, block_k=block_k)
    expected = np.asarray(masks.dilated_window_mask(seq, left=left, right=right))
    np.testing.assert_array_equal(visited(layout, 0)[:seq, :seq], expected)
    check_transposed_and_flattened(layout)
    # Linear in blocks: each query block visits at most the key blocks its window spans.
    per_row = -(-(block_q + left + right) // block_k) + 1
    assert layout.total_entries() <= layout.num_q_blocks * per_row


def test_band_layout_marks_interior_blocks_full():
    layout = kernel_layouts.band_layout(4096, left=256, right=256, block_q=128, block_k=64)
    rows, _, partial = layout.entries(0)
    interior = rows == 16
    # 640 keys span ten 64-key blocks: the 6 in the middle are inside every row's window.
    assert interior.sum() == 10 and partial[interior].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]


@st.composite
def _bigbird(draw):
    seq = draw(st.integers(1, 60))
    block_size = draw(st.integers(1, 9))
    blocks = -(-seq // block_size)
    heads = draw(st.integers(1, 3))
    radius = draw(st.integers(0, 2))
    causal = draw(st.booleans())
    global_blocks = tuple(draw(st.lists(st.integers(-blocks, blocks - 1), max_size=2)))
    r = draw(st.integers(0, 3))
    if draw(st.booleans()):
        random_layout = bigbird_random_layout(
            blocks, heads, r, num_window_blocks=2 * radius + 1, global_blocks=global_blocks, causal=causal,
            seed=draw(st.integers(0, 1000)),
        )
    else:  # hand-written rows: repeats, -1 and entries inside the window must be handled too
        random_layout = np.asarray(
            draw(st.lists(st.integers(-1, blocks - 1), min_size=heads * blocks * r, max_size=heads * blocks * r)),
            np.int32,
        ).reshape(heads, blocks, r)
    # The slot is any length >= block_size (the backends round up); kernel blocks divide it or
    # (TPU) are whole slots.
    slot = block_size + draw(st.integers(0, block_size))
    lengths = [d for d in range(1, slot + 1) if slot % d == 0]
    lengths += [r * slot for r in range(2, kernel_layouts.MAX_SLOTS_PER_BLOCK + 1)]
    block_q, block_k = draw(st.sampled_from(lengths)), draw(st.sampled_from(lengths))
    spec = specs.BlockSparseSpec(
        block_size=block_size, num_blocks=blocks, window_radius=radius,
        global_blocks=arguments.normalize_global_blocks(global_blocks, blocks), random_layout=random_layout,
        causal=causal,
    )
    return seq, spec, slot, block_q, block_k


@settings(max_examples=100)
@given(_bigbird())
def test_bigbird_layout_matches_mask(problem):
    seq, spec, slot, block_q, block_k = problem
    layout = kernel_layouts.bigbird_layout(spec, seq_len=seq, slot=slot, block_q=block_q, block_k=block_k)
    expected = np.asarray(
        masks.block_sparse_mask(
            seq, block_size=spec.block_size, window_radius=spec.window_radius, global_blocks=spec.global_blocks,
            random_layout=spec.random_layout, causal=spec.causal,
        )
    )[0]
    dense_part = bigbird_dense_part(
        seq, block_size=spec.block_size, global_blocks=spec.global_blocks, causal=spec.causal
    )
    assert layout.layout_heads == spec.random_layout.shape[0]
    assert (layout.sub_block is not None) == (max(block_q, block_k) > slot)
    position = (np.arange(seq) // spec.block_size) * slot + np.arange(seq) % spec.block_size
    for h in range(layout.layout_heads):
        kernel_part = visited(layout, h)[np.ix_(position, position)]
        # Kernel and dense parts make the pattern, and no pair is in both (it would count twice).
        np.testing.assert_array_equal(kernel_part | dense_part, expected[h])
        assert not np.any(kernel_part & dense_part)
        # Nothing is visited at slot padding or past the sequence: that would be wasted work.
        real = np.zeros(layout.padded_len, bool)
        real[position] = True
        rows, cols, _ = layout.entries(h)
        assert np.all([real[c * block_k:(c + 1) * block_k].any() for c in cols.tolist()])
        assert np.all([real[r * block_q:(r + 1) * block_q].any() for r in rows.tolist()])
    check_transposed_and_flattened(layout)


@settings(max_examples=60)
@given(_bigbird())
def test_bigbird_bias_columns_place_each_key_of_a_row_at_its_own_entry(problem):
    # The per-visit bias (relative positions on the Pallas kernels): the visit of kernel blocks
    # (r, c) reads the keys of c at consecutive columns from its table entry. Those columns must
    # be key j's slot within the entry of j's block in the row's kernel key list (where
    # `_visit_bias` puts its term), the same from the forward and the transposed tables.
    seq, spec, slot, block_q, block_k = problem
    layout = kernel_layouts.bigbird_layout(spec, seq_len=seq, slot=slot, block_q=block_q, block_k=block_k)
    if max(block_q, block_k) > slot:
        # The Triton kernels' blocks lie within a slot; a block over several slots has no
        # consecutive columns to read, and must be refused rather than given wrong ones
        # (the Mosaic kernels find a run per slot pair, from the key slots).
        with pytest.raises(NotImplementedError, match="kernel blocks within one slot"):
            kernel_layouts.bigbird_bias_columns(spec, slot, layout)
        _check_key_slots(spec, seq, slot, layout)
        return
    columns, t_columns = kernel_layouts.bigbird_bias_columns(spec, slot, layout)
    assert columns.shape == layout.codes.shape and t_columns.shape == layout.t_codes.shape
    query_blocks, key_blocks, key_used = block_sparse.kernel_key_lists(spec)
    row_of = {int(a): i for i, a in enumerate(query_blocks)}
    width = kernel_layouts.BigBirdPattern(spec, seq_len=seq, slot=slot).visit_bias_width
    for h in range(layout.layout_heads):
        rows, cols, _ = layout.entries(h)
        forward = dict(zip(zip(rows.tolist(), cols.tolist()), columns[h, :len(rows)].tolist()))
        t_cols, t_rows, _ = layout.entries(h, transposed=True)
        assert dict(zip(zip(t_rows.tolist(), t_cols.tolist()), t_columns[h, :len(t_rows)].tolist())) == forward
        for (r, c), first in forward.items():
            a, keys = r * block_q // slot, c * block_k + np.arange(block_k)
            entry, within = (first + np.arange(block_k)) // slot, (first + np.arange(block_k)) % slot
            assert 0 <= first and first + block_k <= width
            np.testing.assert_array_equal(key_blocks[h, row_of[a], entry], keys // slot)
            assert key_used[h, row_of[a], entry].all()
            np.testing.assert_array_equal(within, keys % slot)
    _check_key_slots(spec, seq, slot, layout)


def _check_key_slots(spec, seq, slot, layout):
    # The Mosaic kernels' table (their blocks may span slots): per query block, the key block of each
    # entry of its per-visit bias, as `_visit_bias` lays the entries out (`kernel_key_lists`). A visit
    # searches its query slot's row for each (query slot, key slot) pair it covers: every pair it
    # attends (its sub-mask bit; every visit of a layout within a slot) must be found exactly once,
    # from the forward and the transposed walks alike.
    key_slots = kernel_layouts.BigBirdPattern(spec, seq_len=seq, slot=slot).visit_bias_key_slots()
    query_blocks, key_blocks, key_used = block_sparse.kernel_key_lists(spec)
    np.testing.assert_array_equal(key_slots[:, query_blocks], np.where(key_used, key_blocks, spec.num_blocks))
    n_q, n_k = max(1, layout.block_q // slot), max(1, layout.block_k // slot)
    for h in range(layout.layout_heads):
        for transposed in (False, True):
            owner, other, _ = layout.entries(h, transposed)
            rows, cols = (other, owner) if transposed else (owner, other)
            sub_masks = layout.entry_sub_masks(h, transposed)
            for r, c, sub in zip(rows.tolist(), cols.tolist(), sub_masks.tolist()):
                for i in range(n_q):
                    for j in range(n_k):
                        if layout.sub_block is not None and not (sub >> (i * n_k + j)) & 1:
                            continue
                        a, b = r * layout.block_q // slot + i, c * layout.block_k // slot + j
                        assert (key_slots[h, a] == b).sum() == 1, (h, transposed, a, b)


def _bigbird_4096(causal):
    """(seq, block, spec): 4096 tokens in 64-token blocks, 4 heads, 3 random blocks, the first and last global."""
    seq, block, heads, r = 4096, 64, 4, 3
    blocks = seq // block
    spec = specs.BlockSparseSpec(
        block_size=block, num_blocks=blocks, window_radius=1, global_blocks=(0, blocks - 1),
        random_layout=bigbird_random_layout(blocks, heads, r, global_blocks=(0, -1), causal=causal, seed=0),
        causal=causal,
    )
    return seq, block, spec


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_programs_visit_few_blocks(causal):
    # 4096 tokens in 64-token blocks, 3 random blocks and the first and last blocks global,
    # kernel blocks of one BigBird block (the GPU defaults' fit): visits per program.
    seq, block, spec = _bigbird_4096(causal)
    blocks, r = spec.num_blocks, spec.random_layout.shape[2]
    layout = kernel_layouts.bigbird_layout(spec, seq_len=seq, slot=block, block_q=block, block_k=block)
    row_visits, column_visits = np.diff(layout.offsets, axis=1), np.diff(layout.t_offsets, axis=1)
    # With the global rows and columns in the kernel, their programs walked all 64 blocks (the
    # pattern's block mask's longest row and column); the median program walks a handful.
    heads_mask = np.asarray(
        masks.block_sparse_mask(
            blocks, block_size=1, window_radius=1, global_blocks=spec.global_blocks,
            random_layout=spec.random_layout, causal=causal,
        )
    )[0]  # [heads, blocks, blocks]
    pattern = heads_mask[0]
    assert pattern.sum(-1).max() == pattern.sum(-2).max() == blocks
    # Now a row visits at most its window and random blocks, whatever the sequence length:
    # 3 + 3, causal 2 + 3 (no block after the query).
    assert row_visits.max() == (2 if causal else 3) + r
    # A column is visited by its window and the non-global rows that drew it, as the mask says
    # (for seed 0: 12, causal 18, since causal rows draw only earlier blocks).
    sparse = np.setdiff1d(np.arange(blocks), np.asarray(spec.global_blocks))
    assert np.array_equal(column_visits[:, sparse], heads_mask[:, sparse][:, :, sparse].sum(-2))
    assert column_visits.max() < blocks // 2  # against the 64 a global column walked
    assert np.all(row_visits[:, [0, blocks - 1]] == 0) and np.all(column_visits[:, [0, blocks - 1]] == 0)


def test_layouts_are_cached_per_configuration():
    a = kernel_layouts.band_layout(100, left=3, right=4, block_q=8, block_k=16)
    assert a is kernel_layouts.band_layout(100, left=3, right=4, block_q=8, block_k=16)
    assert a is not kernel_layouts.band_layout(100, left=3, right=5, block_q=8, block_k=16)
    assert not a.codes.flags.writeable


def _spec(random_layout, **overrides):
    fields = dict(block_size=4, num_blocks=6, window_radius=1, global_blocks=(0,), causal=False)
    return specs.BlockSparseSpec(random_layout=random_layout, **fields | overrides)


def test_block_sparse_specs_are_equal_and_hashed_by_content():
    layout = bigbird_random_layout(6, 2, 2, global_blocks=(0,), seed=3)
    a, b = _spec(layout), _spec(layout.copy())
    assert a == b and hash(a) == hash(b)
    assert a != _spec(bigbird_random_layout(6, 2, 2, global_blocks=(0,), seed=4))
    # Same bytes, another shape: another layout.
    assert a != _spec(layout, causal=True) and a != _spec(layout.reshape(2, 3, 4))
    # The spec keeps a read-only copy, so its hash cannot go stale when the caller's array changes.
    layout[0, 1, 0] = 5
    assert a == b and not a.random_layout.flags.writeable
    # So a BigBird layout is cached per spec content.
    layouts = [kernel_layouts.bigbird_layout(s, seq_len=24, slot=4, block_q=4, block_k=2) for s in (a, b)]
    assert layouts[0] is layouts[1]


def test_bigbird_layout_rejects_blocks_straddling_slots():
    spec = specs.BlockSparseSpec(
        block_size=6, num_blocks=8, window_radius=1, global_blocks=(), random_layout=np.zeros((1, 8, 0), np.int32),
        causal=False,
    )
    for block_q in (12, 40):  # part of a slot past a whole one; more slots than a sub-mask holds
        with pytest.raises(ValueError, match="must divide the slot 8 >= block_size 6 or be at most 4 whole slots"):
            kernel_layouts.bigbird_layout(spec, seq_len=48, slot=8, block_q=block_q, block_k=8)


def _fit(pattern, block, block_sizes):
    return pattern.fit(block, block_sizes, False, "block_q")


def test_bigbird_fit_takes_whole_slots_on_tpu_only():
    spec = specs.BlockSparseSpec(
        block_size=60, num_blocks=8, window_radius=1, global_blocks=(),
        random_layout=np.zeros((1, 8, 0), np.int32), causal=False,
    )
    tpu, gpu = TpuBlockSizes(), GpuBlockSizes()
    pattern = kernel_layouts.BigBirdPattern(spec, seq_len=480, slot=64)
    # TPU: the most whole slots a block holds, at most 4 and the pattern's 8 blocks.
    assert [_fit(pattern, b, tpu) for b in (64, 128, 192, 200, 256, 512)] == [64, 128, 192, 192, 256, 256]
    # GPU: a slot at most (the Triton kernels take no slot masks); shorter blocks divide it.
    assert [_fit(pattern, b, gpu) for b in (16, 64, 128)] == [16, 64, 64]
    three = dataclasses.replace(spec, num_blocks=3, random_layout=np.zeros((1, 3, 0), np.int32))
    assert _fit(kernel_layouts.BigBirdPattern(three, seq_len=180, slot=64), 512, tpu) == 192
    with pytest.raises(NotImplementedError, match="block_sizes.block_q=24 does not divide the BigBird kernel slot"):
        _fit(pattern, 24, tpu)
    # Blocks past the slots leave empty kernel blocks at the end (no visits, rows written empty).
    assert pattern.padded_len((128, 192)) == 768
    layout = pattern.layout(128, 192, 768)
    assert layout.num_q_blocks == 6 and layout.num_k_blocks == 4 and layout.sub_blocks_k == 3
    assert not np.any(np.diff(layout.offsets[0])[4:])


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_two_slot_blocks_visit_fewer_blocks(causal):
    # 64-token BigBird blocks in 128-position kernel blocks (TPU defaults): each visit covers four
    # block pairs, and its bits say which it attends. Fewer visits, each with 4x the scores.
    seq, block, spec = _bigbird_4096(causal)
    heads = spec.random_layout.shape[0]
    one = kernel_layouts.bigbird_layout(spec, seq_len=seq, slot=block, block_q=block, block_k=block)
    two = kernel_layouts.bigbird_layout(spec, seq_len=seq, slot=block, block_q=2 * block, block_k=2 * block)
    assert two.sub_block == block and two.sub_blocks_q == two.sub_blocks_k == 2
    # Measured for this layout (seed 0): a quarter fewer visits.
    assert two.total_entries() < 0.8 * one.total_entries()
    masks_ = np.concatenate([two.entry_sub_masks(h) for h in range(heads)])
    partial = np.concatenate([two.entries(h)[2] for h in range(heads)])
    # Full visits (every pair attended, off the diagonal) run unmasked: window blocks, mostly.
    assert np.all(masks_[partial == 0] == 0b1111) and 0 < np.mean(partial == 0) < 0.5
