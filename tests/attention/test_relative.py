"""The relative shift and the dense position term of `longjax.attention.relative`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from longjax.attention import relative
from longjax.models import positions

# (rows B, offsets W, shift, span): interior blocks (shift 0), the first block of a clipped
# window (shift > 0), a span wider than the skewed rows, and shifts left of every column.
SHAPES = [(4, 5, 0, 8), (4, 5, -3, 10), (3, 7, 2, 6), (5, 3, 4, 12), (1, 1, 0, 1), (4, 9, -6, 4)]


@pytest.mark.parametrize("rows, width, shift, span", SHAPES)
def test_skew_places_column_s_minus_r_plus_shift_at_key_s(rows, width, shift, span):
    by_offset = np.random.default_rng(0).normal(size=(2, rows, width)).astype(np.float32)
    expected = np.zeros((2, rows, span), np.float32)
    for r in range(rows):
        for s in range(span):
            if 0 <= s - r + shift < width:
                expected[:, r, s] = by_offset[:, r, s - r + shift]
    np.testing.assert_array_equal(relative.skew(jnp.asarray(by_offset), shift=shift, span=span), expected)


@pytest.mark.parametrize("rows, width, shift, span", SHAPES)
def test_unskew_is_the_transpose_of_skew(rows, width, shift, span):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, rows, width)).astype(np.float32)
    y = rng.normal(size=(3, rows, span)).astype(np.float32)
    forward = np.sum(np.asarray(relative.skew(jnp.asarray(x), shift=shift, span=span)) * y)
    backward = np.sum(x * np.asarray(relative.unskew(jnp.asarray(y), shift=shift, width=width)))
    np.testing.assert_allclose(forward, backward, rtol=1e-5)


def test_dense_scores_pair_each_query_with_the_embedding_of_its_offset():
    rng = np.random.default_rng(2)
    seq, heads, dim, max_offset = 6, 2, 3, 5
    queries = rng.normal(size=(1, seq, heads, dim)).astype(np.float32)
    table = rng.normal(size=(2 * max_offset + 1, heads, dim)).astype(np.float32)
    got = relative.dense_scores(relative.RelativePositions(jnp.asarray(queries), jnp.asarray(table)), seq)
    for i in range(seq):
        for j in range(seq):
            np.testing.assert_allclose(got[0, :, i, j], np.sum(queries[0, i] * table[max_offset + i - j], -1), rtol=1e-5)


def test_offset_rows_run_from_the_left_reach_down_to_the_right_one():
    table = jnp.arange(11, dtype=jnp.float32)[:, None, None] * jnp.ones((1, 2, 1))
    rows = relative.offset_rows(table, max_offset=5, left=2, right=1, step=2)
    # Offsets 4, 2, 0, -2 sit at rows 9, 7, 5, 3.
    np.testing.assert_array_equal(rows[0, :, 0], [9, 7, 5, 3])


def test_txl_embeddings_are_the_projected_sinusoids_with_unused_rows_zero():
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(8, 2, 3)), jnp.float32)
    table = positions.txl_relative_embeddings(kernel, max_offset=4, first=-1, last=3)
    assert table.shape == (9, 2, 3)
    expected = jnp.einsum("md,dhe->mhe", positions.relative_sinusoid(jnp.arange(-1, 4), 8), kernel)
    np.testing.assert_allclose(table[3:8], expected, rtol=1e-6)
    assert not np.any(table[:3]) and not np.any(table[8:])
