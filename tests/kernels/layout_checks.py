"""Checks of a `BlockLayout`'s invariants, shared by the kernel's layout tests and the patterns' ones."""

from __future__ import annotations

import numpy as np

from kernels_pallas import block_layout


def visited(layout, head: int):
    """bool `[padded, padded]`: the pairs the kernel attends (before key validity).

    Written here independently of the kernel: full blocks whole, partial blocks
    through the in-kernel band and, with sub-blocks, their sub-mask (bit
    `a * sub_blocks_k + b` for query sub-block a, key sub-block b of the
    visit). Fails if a block pair is visited twice (a repeat would count its
    keys twice).
    """
    n = layout.padded_len
    dense = np.zeros((n, n), bool)
    seen = set()
    rows, cols, partial = layout.entries(head)
    sub_masks = layout.entry_sub_masks(head)
    for r, c, p, m in zip(rows.tolist(), cols.tolist(), partial.tolist(), sub_masks.tolist()):
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
            if layout.sub_block is not None:
                a = (q - r * layout.block_q) // layout.sub_block
                b = (k - c * layout.block_k) // layout.sub_block
                allowed &= (m >> (a * layout.sub_blocks_k + b)) & 1 == 1
        dense[r * layout.block_q:(r + 1) * layout.block_q, c * layout.block_k:(c + 1) * layout.block_k] = allowed
    return dense


def bigbird_dense_part(seq_len: int, *, block_size: int, global_blocks, causal: bool):
    """bool `[seq, seq]`: the part of a BigBird pattern left out of its kernel layout.

    Written from the pattern's definition: the rows of the global blocks (they
    see every key) and the columns of the global blocks (every query sees
    them), causal applied. `masks.block_sparse_mask` without token-level globals
    and padding is this part or the kernel's, never both.
    """
    in_global = np.isin(np.arange(seq_len) // block_size, np.asarray(global_blocks, np.int64))
    dense = in_global[:, None] | in_global[None, :]
    if causal:
        dense &= np.tril(np.ones((seq_len, seq_len), bool))
    return dense


def check_transposed_and_flattened(layout):
    """The transposed and flattened forms list the same visits (and sub-masks) as the CSR rows."""
    for h in range(layout.layout_heads):
        forward = {(*x, m) for *x, m in zip(*(a.tolist() for a in layout.entries(h)), layout.entry_sub_masks(h))}
        t_rows, t_cols, t_partial = layout.entries(h, transposed=True)
        t_masks = layout.entry_sub_masks(h, transposed=True)
        assert {(c, r, p, m) for r, c, p, m in zip(t_rows.tolist(), t_cols.tolist(), t_partial.tolist(),
                                                   t_masks.tolist())} == forward
        assert len(t_rows) == len(forward)
        for transposed, n_rows in ((False, layout.num_q_blocks), (True, layout.num_k_blocks)):
            rows, cols, flags = (x[h] for x in layout.flattened(transposed))
            masks = layout.flattened_sub_masks(transposed)[h]
            compute = (flags & block_layout.FLAG_COMPUTE) != 0
            expected = layout.entries(h, transposed)
            np.testing.assert_array_equal(rows[compute], expected[0])
            np.testing.assert_array_equal(cols[compute], expected[1])
            np.testing.assert_array_equal(flags[compute] & block_layout.FLAG_PARTIAL, expected[2])
            np.testing.assert_array_equal(masks[compute], layout.entry_sub_masks(h, transposed))
            assert not np.any(masks[~compute])
            # Every row appears once, contiguously, first visit flagged FIRST and last flagged LAST.
            firsts = np.flatnonzero(flags & block_layout.FLAG_FIRST)
            lasts = np.flatnonzero(flags & block_layout.FLAG_LAST)
            np.testing.assert_array_equal(rows[firsts], np.arange(n_rows))
            np.testing.assert_array_equal(rows[lasts], np.arange(n_rows))
            assert np.all(lasts >= firsts) and np.all(firsts[1:] == lasts[:-1] + 1)
            # After the last row only fillers remain, which repeat the last visit.
            tail = slice(lasts[-1] + 1, None)
            assert not np.any(flags[tail]) and np.all(rows[tail] == rows[lasts[-1]])
