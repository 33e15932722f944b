"""The oracle itself: masks against a direct loop over the definition, and dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from longjax.attention import dense_attention, masks


def _loop_mask(seq, left, right, dilations, causal, global_mask, padding_mask):
    """The Longformer pattern, one (query, key) pair at a time, from the definition."""
    batch = global_mask.shape[0]
    out = np.zeros((batch, len(dilations), seq, seq), bool)
    for b in range(batch):
        for h, d in enumerate(dilations):
            for i in range(seq):
                for j in range(seq):
                    in_window = any(j - i == d * t for t in range(-left, right + 1))
                    allowed = in_window or global_mask[b, i] or global_mask[b, j]
                    if causal and j > i:
                        allowed = False
                    if not (padding_mask[b, i] and padding_mask[b, j]):
                        allowed = False
                    out[b, h, i, j] = allowed
    return out


@settings(max_examples=60)
@given(
    seq=st.integers(1, 14),
    left=st.integers(0, 5),
    right=st.integers(0, 5),
    dilations=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    causal=st.booleans(),
    data=st.data(),
)
def test_sliding_window_mask_matches_definition(seq, left, right, dilations, causal, data):
    bits = st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq), min_size=2, max_size=2)
    global_mask = np.asarray(data.draw(bits), bool)
    padding_mask = np.asarray(data.draw(bits), bool)
    got = masks.sliding_window_mask(
        seq, left=left, right=right, dilation=dilations, causal=causal,
        global_mask=jnp.asarray(global_mask), padding_mask=jnp.asarray(padding_mask),
    )
    want = _loop_mask(seq, left, right, dilations, causal, global_mask, padding_mask)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)


def test_dense_attention_matches_jax_nn():
    q, k, v = (jax.random.normal(key, (2, 9, 3, 8)) for key in jax.random.split(jax.random.key(1), 3))
    mask = masks.causal_mask(9)[None, None]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(dense_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-6)


def test_dense_attention_empty_row_is_zero_with_finite_gradient():
    q, k, v = (jax.random.normal(key, (1, 4, 1, 2)) * 50 for key in jax.random.split(jax.random.key(2), 3))
    mask = jnp.asarray([[True] * 4, [False] * 4, [True, False, False, False], [False] * 4])[None, None]
    out = dense_attention(q, k, v, mask)
    assert np.all(np.asarray(out[0, 1]) == 0) and np.all(np.asarray(out[0, 3]) == 0)
    np.testing.assert_allclose(out[0, 2], v[0, 0], rtol=1e-6)
    grads = jax.grad(lambda *x: jnp.sum(dense_attention(*x, mask)), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)


def _loop_block_sparse_mask(seq, block, radius, global_blocks, layout, causal, global_mask, padding_mask):
    """BigBird's pattern one (query, key) token pair at a time, from the definition."""
    blocks = layout.shape[1]
    globals_ = {g % blocks for g in global_blocks}
    batch = global_mask.shape[0]
    out = np.zeros((batch, layout.shape[0], seq, seq), bool)
    for b in range(batch):
        for h in range(layout.shape[0]):
            for i in range(seq):
                for j in range(seq):
                    a, c = i // block, j // block
                    allowed = (
                        a in globals_ or c in globals_ or abs(a - c) <= radius
                        or c in layout[h, a].tolist() or global_mask[b, i] or global_mask[b, j]
                    )
                    if (causal and j > i) or not (padding_mask[b, i] and padding_mask[b, j]):
                        allowed = False
                    out[b, h, i, j] = allowed
    return out


@settings(max_examples=40)
@given(
    seq=st.integers(1, 14), block=st.integers(1, 4), radius=st.integers(0, 2), r=st.integers(0, 2),
    heads=st.integers(1, 2), causal=st.booleans(), data=st.data(),
)
def test_block_sparse_mask_matches_definition(seq, block, radius, r, heads, causal, data):
    blocks = -(-seq // block)
    global_blocks = data.draw(st.lists(st.integers(-blocks, blocks - 1), max_size=2))
    layout = np.asarray(
        data.draw(st.lists(st.integers(-1, blocks - 1), min_size=heads * blocks * r, max_size=heads * blocks * r)),
        np.int32,
    ).reshape(heads, blocks, r)
    bits = st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq), min_size=2, max_size=2)
    global_mask = np.asarray(data.draw(bits), bool)
    padding_mask = np.asarray(data.draw(bits), bool)
    got = masks.block_sparse_mask(
        seq, block_size=block, window_radius=radius, global_blocks=global_blocks, random_layout=layout,
        causal=causal, global_mask=jnp.asarray(global_mask), padding_mask=jnp.asarray(padding_mask),
    )
    want = _loop_block_sparse_mask(seq, block, radius, global_blocks, layout, causal, global_mask, padding_mask)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
