"""The kernels' `BlockLayout` on its own: built from visits given in any order, its CSR rows, transposed
and flattened forms list the same visits (and sub-block masks), and it refuses visits it cannot encode.

The layouts of the attention patterns are tested against their exact masks in
tests/attention/test_kernel_layouts.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels_pallas.block_layout import BlockLayout
from tests.kernels.layout_checks import check_transposed_and_flattened, visited


@st.composite
def _visits(draw):
    # One padded length for rows and columns, as the kernels use: n = num_q * block_q = num_k * block_k.
    block_q, block_k = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    n = 4 * draw(st.integers(1, 4))
    num_q, num_k = n // block_q, n // block_k
    per_head = []
    for _ in range(draw(st.integers(1, 3))):
        pairs = draw(st.sets(st.tuples(st.integers(0, num_q - 1), st.integers(0, num_k - 1)), max_size=24))
        pairs = draw(st.permutations(sorted(pairs)))
        partial = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
        per_head.append((np.asarray([p[0] for p in pairs], np.int64), np.asarray([p[1] for p in pairs], np.int64),
                         np.asarray(partial, bool)))
    band = draw(st.sampled_from([(None, None), (None, 0), (2, 3)]))
    sub_block, sub_masks = None, None
    if draw(st.booleans()):  # sub-blocks of 1 or 2 positions: 1 to 16 bits per visit
        sub_block = draw(st.sampled_from([1, 2]))
        bits = max(1, block_q // sub_block) * max(1, block_k // sub_block)
        sub_masks = [
            np.asarray([(1 << bits) - 1 if not p else draw(st.integers(1, (1 << bits) - 1)) for p in partial])
            for _, _, partial in per_head
        ]
    return per_head, (block_q, block_k, num_q, num_k), band, (sub_block, sub_masks)


@settings(max_examples=60)
@given(_visits())
def test_layout_lists_the_visits_it_is_given(problem):
    per_head, (block_q, block_k, num_q, num_k), (left, right), (sub_block, sub_masks) = problem
    layout = BlockLayout.from_visits(
        per_head, block_q=block_q, block_k=block_k, num_q_blocks=num_q, num_k_blocks=num_k, left=left, right=right,
        sub_block=sub_block, sub_masks=sub_masks,
    )
    assert layout.layout_heads == len(per_head) and layout.padded_len == num_q * block_q
    for h, (rows, cols, partial) in enumerate(per_head):
        got = {(*x, m) for *x, m in zip(*(a.tolist() for a in layout.entries(h)), layout.entry_sub_masks(h).tolist())}
        masks = [1] * len(rows) if sub_masks is None else sub_masks[h].tolist()
        assert got == {(r, c, int(p), m) for r, c, p, m in zip(rows.tolist(), cols.tolist(), partial.tolist(), masks)}
        visited(layout, h)  # no pair twice
    assert layout.total_entries() == sum(len(v[0]) for v in per_head)
    check_transposed_and_flattened(layout)
    assert not any(a.flags.writeable for a in (layout.offsets, layout.codes, layout.t_offsets, layout.t_codes))


def test_layout_refuses_repeated_or_out_of_range_visits():
    build = lambda rows, cols: BlockLayout.from_visits(
        [(np.asarray(rows), np.asarray(cols), np.zeros(len(rows)))], block_q=4, block_k=4, num_q_blocks=2,
        num_k_blocks=3, left=None, right=None,
    )
    with pytest.raises(ValueError, match=r"block pair \(1, 2\) is visited twice"):
        build([1, 0, 1], [2, 0, 2])
    with pytest.raises(ValueError, match="visits must lie in"):
        build([0, 2], [0, 0])
    with pytest.raises(ValueError, match="visits must lie in"):
        build([0], [3])


def test_layout_refuses_sub_masks_it_cannot_encode():
    build = lambda sub_block, masks, partial=(1,), block_q=4: BlockLayout.from_visits(
        [(np.asarray([0]), np.asarray([0]), np.asarray(partial))], block_q=block_q, block_k=4, num_q_blocks=2,
        num_k_blocks=2, left=None, right=None, sub_block=sub_block, sub_masks=None if masks is None else [masks],
    )
    with pytest.raises(ValueError, match="sub_block and sub_masks go together"):
        build(2, None)
    with pytest.raises(ValueError, match="block_q=4 must be a multiple or a divisor of sub_block=3"):
        build(3, np.asarray([1]))
    with pytest.raises(ValueError, match="need 32-bit sub-masks, over 16"):
        build(1, np.asarray([1]), block_q=8)
    for masks, partial in (([0], (1,)), ([16], (1,)), ([7], (0,))):  # empty, too wide, full but not all ones
        with pytest.raises(ValueError, match="sub-masks must be nonzero 4-bit masks, all ones for full visits"):
            build(2, np.asarray(masks), partial)
