"""The kernels' block layouts against the exact masks of `longjax.attention.masks`.

The union of the visited blocks (full blocks whole, partial blocks through the
in-kernel band, written here independently of the kernel) must equal the
pattern's dense mask, with every block pair visited at most once (a repeat
would count its keys twice), and the transposed and flattened forms must list
the same visits.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels_pallas import block_layout
from longjax.attention import arguments, bigbird_random_layout, masks


def _visited(layout, head: int):
    """bool `[padded, padded]`: the pairs the kernel attends (before key validity)."""
    n = layout.padded_len
    dense = np.zeros((n, n), bool)
    seen = set()
    rows, cols, partial = layout.entries(head)
    for r, c, p in zip(rows.tolist(), cols.tolist(), partial.tolist()):
        assert (r, c) not in seen, f"block pair {(r, c)} visited twice"
        seen.add((r, c))
        q = r * layout.block_q + np.arange(layout.block_q)[:, None]
        k = c * layout.block_k + np.arange(layout.block_k)[None, :]
        allowed = np.ones((layout.block_q, layout.block_k), bool)
        if p:
            if layout.left is not None:
                allowed &= k - q >= -layout.left
            if layout.right is not None:
                allowed &= k - q <= layout.right
        dense[r * layout.block_q:(r + 1) * layout.block_q, c * layout.block_k:(c + 1) * layout.block_k] = allowed
    return dense


def _check_transposed_and_flattened(layout):
    for h in range(layout.layout_heads):
        forward = {tuple(x) for x in zip(*(a.tolist() for a in layout.entries(h)))}
        t_rows, t_cols, t_partial = layout.entries(h, transposed=True)
        assert {(c, r, p) for r, c, p in zip(t_rows.tolist(), t_cols.tolist(), t_partial.tolist())} == forward
        assert len(t_rows) == len(forward)
        for transposed, n_rows in ((False, layout.num_q_blocks), (True, layout.num_k_blocks)):
            rows, cols, flags = (x[h] for x in layout.flattened(transposed))
            compute = (flags & block_layout.FLAG_COMPUTE) != 0
            expected = layout.entries(h, transposed)
            np.testing.assert_array_equal(rows[compute], expected[0])
            np.testing.assert_array_equal(cols[compute], expected[1])
            np.testing.assert_array_equal(flags[compute] & block_layout.FLAG_PARTIAL, expected[2])
            # Every row appears once, contiguously, first visit flagged FIRST and last flagged LAST.
            firsts = np.flatnonzero(flags & block_layout.FLAG_FIRST)
            lasts = np.flatnonzero(flags & block_layout.FLAG_LAST)
            np.testing.assert_array_equal(rows[firsts], np.arange(n_rows))
            np.testing.assert_array_equal(rows[lasts], np.arange(n_rows))
            assert np.all(lasts >= firsts) and np.all(firsts[1:] == lasts[:-1] + 1)
            # After the last row only fillers remain, which repeat the last visit.
            tail = slice(lasts[-1] + 1, None)
            assert not np.any(flags[tail]) and np.all(rows[tail] == rows[lasts[-1]])


_BLOCKS = st.sampled_from([1, 2, 4, 8, 16, 24])


@settings(max_examples=80)
@given(seq=st.integers(1, 70), left=st.integers(0, 40), right=st.integers(0, 40), block_q=_BLOCKS, block_k=_BLOCKS)
def test_band_layout_matches_mask(seq, left, right, block_q, block_k):
    layout = block_layout.band_layout(seq, left=left, right=right, block_q=block_q, block_k=block_k)
    expected = np.asarray(masks.dilated_window_mask(seq, left=left, right=right))
    np.testing.assert_array_equal(_visited(layout, 0)[:seq, :seq], expected)
    _check_transposed_and_flattened(layout)
    # Linear in blocks: each query block visits at most the key blocks its window spans.
    per_row = -(-(block_q + left + right) // block_k) + 1
    assert layout.total_entries() <= layout.num_q_blocks * per_row


def test_band_layout_marks_interior_blocks_full():
    layout = block_layout.band_layout(4096, left=256, right=256, block_q=128, block_k=64)
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
    # The slot is any length >= block_size (the backends round up); kernel blocks divide it.
    slot = block_size + draw(st.integers(0, block_size))
    divisors = [d for d in range(1, slot + 1) if slot % d == 0]
    block_q, block_k = draw(st.sampled_from(divisors)), draw(st.sampled_from(divisors))
    spec = arguments.BlockSparseSpec(
        block_size=block_size, num_blocks=blocks, window_radius=radius,
        global_blocks=arguments.normalize_global_blocks(global_blocks, blocks), random_layout=random_layout,
        causal=causal,
    )
    return seq, spec, slot, block_q, block_k


@settings(max_examples=80)
@given(_bigbird())
def test_bigbird_layout_matches_mask(problem):
    seq, spec, slot, block_q, block_k = problem
    layout = block_layout.bigbird_layout(spec, seq_len=seq, slot=slot, block_q=block_q, block_k=block_k)
    expected = np.asarray(
        masks.block_sparse_mask(
            seq, block_size=spec.block_size, window_radius=spec.window_radius, global_blocks=spec.global_blocks,
            random_layout=spec.random_layout, causal=spec.causal,
        )
    )[0]
    assert layout.layout_heads == spec.random_layout.shape[0]
    position = (np.arange(seq) // spec.block_size) * slot + np.arange(seq) % spec.block_size
    for h in range(layout.layout_heads):
        visited = _visited(layout, h)
        np.testing.assert_array_equal(visited[np.ix_(position, position)], expected[h])
        # Nothing is visited at slot padding or past the sequence: that would be wasted work.
        real = np.zeros(layout.padded_len, bool)
        real[position] = True
        rows, cols, _ = layout.entries(h)
        assert np.all([real[c * block_k:(c + 1) * block_k].any() for c in cols.tolist()])
        assert np.all([real[r * block_q:(r + 1) * block_q].any() for r in rows.tolist()])
    _check_transposed_and_flattened(layout)


def test_layouts_are_cached_per_configuration():
    a = block_layout.band_layout(100, left=3, right=4, block_q=8, block_k=16)
    assert a is block_layout.band_layout(100, left=3, right=4, block_q=8, block_k=16)
    assert a is not block_layout.band_layout(100, left=3, right=5, block_q=8, block_k=16)
    assert not a.codes.flags.writeable


def test_bigbird_layout_rejects_blocks_straddling_slots():
    spec = arguments.BlockSparseSpec(
        block_size=6, num_blocks=4, window_radius=1, global_blocks=(), random_layout=np.zeros((1, 4, 0), np.int32),
        causal=False,
    )
    with pytest.raises(ValueError, match="must divide the slot"):
        block_layout.bigbird_layout(spec, seq_len=24, slot=8, block_q=16, block_k=8)
