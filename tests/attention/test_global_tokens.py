"""The dense global-token passes in chunks: the dense math's values and gradients, and
compiled memory without `[seq, globals]` arrays."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.common import MASK_VALUE
from longjax.attention import block_sparse_attention, global_tokens, reference, sliding_window_attention
from tests.attention import battery

# Several chunks, the last one moved back over its neighbour's keys: 1100 positions with
# 320 globals go in 512-position chunks (asserted in `test_chunk_length`).
BATCH, HEADS, SEQ, HEAD_DIM, GLOBALS = 2, 2, 1100, 16, 320
TOL = battery.tolerance(jnp.float32)
OPTIONS = [
    pytest.param(dict(causal=False, padded=False), id="plain"),
    pytest.param(dict(causal=True, padded=True), id="causal-padding"),
]


def test_chunk_length():
    assert global_tokens.chunk_length(SEQ, GLOBALS) == 512
    assert global_tokens.chunk_length(32768, 128) == 2048
    # Short inputs, such as the batteries', take one chunk: the plain dense pass.
    assert global_tokens.chunk_length(48, 8) == 48
    assert global_tokens.chunk_length(2048, 128) == 2048
    # However many globals, a chunk holds at most CHUNK_SCORES scores, or is MIN_CHUNK long.
    for globals_ in (1, 3, 100, 513, 4096, 10**6):
        chunk = global_tokens.chunk_length(10**7, globals_)
        assert chunk * globals_ <= global_tokens.CHUNK_SCORES or chunk == global_tokens.MIN_CHUNK
        assert 2 * chunk * globals_ > global_tokens.CHUNK_SCORES


def _problem(causal: bool, padded: bool, seed: int = 0):
    """(q, k, v) f32 `[batch, heads, seq, head_dim]`, positions int NumPy `[GLOBALS]`, key_valid."""
    q, k, v = battery.random_inputs(seed, (BATCH, HEADS, SEQ, HEAD_DIM), jnp.float32, 3)
    positions = np.random.default_rng(seed).choice(SEQ, GLOBALS, replace=False).astype(np.int32)
    lengths = (SEQ, 700) if padded else (SEQ, SEQ)
    return (q, k, v), positions, battery.padding_mask(BATCH, SEQ, lengths)


def _dense(q, k, v, mask, scale):
    """Oracle: (out, lse) of `[batch, heads, rows, head_dim]` queries under a dense bool mask.

    An empty row has out 0 and lse MASK_VALUE, as the passes promise.
    """
    to_bnhd = lambda x: jnp.swapaxes(x, 1, 2)
    out = jnp.swapaxes(reference.dense_attention(*map(to_bnhd, (q, k, v)), mask, scale=scale), 1, 2)
    scores = jnp.where(mask, jnp.einsum("bhnd,bhkd->bhnk", q, k) * scale, MASK_VALUE)
    lse = jnp.where(jnp.any(mask, axis=-1), jax.nn.logsumexp(scores, axis=-1), MASK_VALUE)
    return out, lse


def _assert_values_and_grads(fn, oracle, arrays, seed):
    """fn and oracle, pytrees of float32 outputs, agree in value and in the gradients of a random projection."""
    outs = jax.eval_shape(fn, *arrays)
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(outs)))
    cotangents = jax.tree.unflatten(
        jax.tree.structure(outs),
        [jax.random.normal(key, o.shape, o.dtype) for key, o in zip(keys, jax.tree.leaves(outs))],
    )

    def value_and_grads(f):
        loss = lambda *xs: sum(jnp.sum(o * c) for o, c in zip(jax.tree.leaves(f(*xs)), jax.tree.leaves(cotangents)))
        return jax.jit(lambda *xs: (f(*xs), jax.grad(loss, argnums=tuple(range(len(xs))))(*xs)))(*arrays)

    (out, grads), (ref, ref_grads) = value_and_grads(fn), value_and_grads(oracle)
    for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads))):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("options", OPTIONS)
def test_to_keys_at_matches_dense(options):
    causal = options["causal"]
    arrays, positions, key_valid = _problem(**options)
    scale = HEAD_DIM**-0.5
    fn = lambda q, k, v: tuple(global_tokens.to_keys_at(q, k, v, positions, key_valid, causal=causal, scale=scale))

    def oracle(q, k, v):
        mask = np.zeros(SEQ, bool)
        mask[positions] = True
        mask = jnp.asarray(mask)[None, None, None, :] & key_valid[:, None, None, :]
        if causal:
            mask = mask & jnp.tril(jnp.ones((SEQ, SEQ), bool))
        return _dense(q, k, v, mask, scale)

    _assert_values_and_grads(fn, oracle, arrays, seed=1)


@pytest.mark.parametrize("options", OPTIONS)
def test_from_queries_at_matches_dense(options):
    causal = options["causal"]
    arrays, positions, key_valid = _problem(**options)
    scale = HEAD_DIM**-0.5
    fn = lambda q, k, v: global_tokens.from_queries_at(q, k, v, positions, key_valid, causal=causal, scale=scale)

    def oracle(q, k, v):
        mask = key_valid[:, None, None, :]
        if causal:
            mask = mask & jnp.asarray(np.arange(SEQ)[None, :] <= positions[:, None])
        return _dense(q[:, :, positions], k, v, mask, scale)[0]

    _assert_values_and_grads(fn, oracle, arrays, seed=2)


@pytest.mark.parametrize("options", OPTIONS[1:])
def test_the_global_rows_log_sum_exp_has_its_gradient(options):
    """The rows pass's lse, which the sequence-parallel merge differentiates, against the dense one."""
    causal = options["causal"]
    arrays, positions, key_valid = _problem(**options)
    scale = HEAD_DIM**-0.5
    slots = jnp.broadcast_to(jnp.asarray(positions), (BATCH, GLOBALS))
    used = jnp.ones(slots.shape, bool)

    def fn(q, k, v):
        return tuple(global_tokens.from_gathered_queries(
            q[:, :, positions], k, v, key_valid, slots, used, causal=causal, scale=scale
        ))

    def oracle(q, k, v):
        mask = key_valid[:, None, None, :]
        if causal:
            mask = mask & jnp.asarray(np.arange(SEQ)[None, :] <= positions[:, None])
        return _dense(q[:, :, positions], k, v, mask, scale)

    assert global_tokens.chunk_length(SEQ, GLOBALS) < SEQ  # the chunked pass, with its custom gradient
    _assert_values_and_grads(fn, oracle, arrays, seed=4)


def _global_mask():
    """bool `[batch, seq]`: GLOBALS - 20 random globals in row 0, GLOBALS (every slot) in row 1."""
    rng = np.random.default_rng(3)
    mask = np.zeros((BATCH, SEQ), bool)
    mask[0, rng.choice(SEQ, GLOBALS - 20, replace=False)] = True
    mask[1, rng.choice(SEQ, GLOBALS, replace=False)] = True
    return jnp.asarray(mask)


@pytest.mark.parametrize(
    "options, separate_global_qkv",
    [(options.values[0], False) for options in OPTIONS] + [(OPTIONS[1].values[0], True)],
    ids=["plain", "causal-padding", "causal-padding-separate-qkv"],
)
def test_sliding_window_globals_in_chunks_match_reference(options, separate_global_qkv):
    """add_global_tokens in several chunks, through the XLA Longformer op, against the dense reference."""
    causal, padded = options["causal"], options["padded"]
    count = 6 if separate_global_qkv else 3
    arrays = battery.random_inputs(4, (BATCH, SEQ, HEADS, HEAD_DIM), jnp.float32, count)
    global_mask = _global_mask()
    padding_mask = battery.padding_mask(BATCH, SEQ, (SEQ, 700) if padded else (SEQ, SEQ))
    options = dict(window=5, causal=causal, global_mask=global_mask, padding_mask=padding_mask)

    def fn(q, k, v, *global_qkv):
        return sliding_window_attention(
            q, k, v, global_qkv=global_qkv or None, max_global_tokens=GLOBALS, impl="xla", **options
        )

    def ref(q, k, v, *global_qkv):
        return sliding_window_attention(q, k, v, global_qkv=global_qkv or None, impl="reference", **options)

    battery.assert_matches_reference(fn, ref, arrays)


def test_block_sparse_token_globals_in_chunks_match_reference():
    """add_global_tokens in several chunks beside BigBird's global blocks (XLA op), against the reference."""
    arrays = battery.random_inputs(5, (BATCH, SEQ, HEADS, HEAD_DIM), jnp.float32, 3)
    options = dict(
        block_size=50, causal=True, global_mask=_global_mask(),
        padding_mask=battery.padding_mask(BATCH, SEQ, (SEQ, 700)),
    )
    fn = functools.partial(block_sparse_attention, impl="xla", max_global_tokens=GLOBALS, **options)
    battery.assert_matches_reference(fn, functools.partial(block_sparse_attention, impl="reference", **options), arrays)


def test_bfloat16_in_chunks_keeps_dtypes():
    """Chunked gradients come back in the inputs' dtype; outputs stay float32."""
    (q, k, v), positions, key_valid = _problem(causal=True, padded=True)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

    def loss(q, k, v):
        part = global_tokens.to_keys_at(q, k, v, positions, key_valid, causal=True, scale=0.25)
        rows = global_tokens.from_queries_at(q, k, v, positions, key_valid, causal=True, scale=0.25)
        assert part.out.dtype == part.lse.dtype == rows.dtype == jnp.float32
        return jnp.sum(part.out) + jnp.sum(part.lse) + jnp.sum(rows)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


# Memory: BigBird's global-block passes, forward and gradient, as the block-sparse kernels use
# them, at 16 heads, head_dim 64, bfloat16, compiled (not run) for the CPU.
MEM_HEADS, MEM_HEAD_DIM = 16, 64


def _global_pass_temp_bytes(seq: int, num_globals: int) -> int:
    positions = np.arange(num_globals, dtype=np.int32)

    def loss(q, k, v, key_valid):
        part = global_tokens.to_keys_at(q, k, v, positions, key_valid, causal=True, scale=0.125)
        rows = global_tokens.from_queries_at(q, k, v, positions, key_valid, causal=True, scale=0.125)
        return jnp.sum(part.out) + jnp.sum(part.lse) + jnp.sum(rows)

    x = jax.ShapeDtypeStruct((1, MEM_HEADS, seq, MEM_HEAD_DIM), jnp.bfloat16)
    key_valid = jax.ShapeDtypeStruct((1, seq), jnp.bool_)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x, key_valid).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _f32_bytes(*shape):
    return 4 * int(np.prod(shape))


def test_memory_grows_with_seq_by_head_dim_arrays_only():
    """8K -> 32K tokens at 128 globals: what grows is `[seq, head_dim]` arrays, no `[seq, globals]` one.

    The float32 `[seq, head_dim]` arrays a forward and gradient need: the pass's output and
    its cotangent, the gradients of q, k and v, and the float32 copies of q, k and v the CPU
    makes for bfloat16 matmuls: 8. The bound allows those and less than one more
    `[seq, globals]` float32 array (the unchunked passes held about ten).
    """
    small, large = 8192, 32768
    growth = _global_pass_temp_bytes(large, 128) - _global_pass_temp_bytes(small, 128)
    per_seq_by_head_dim = _f32_bytes(MEM_HEADS, large - small, MEM_HEAD_DIM)
    bound = 8 * per_seq_by_head_dim + _f32_bytes(MEM_HEADS, large - small, 128)
    assert growth <= bound, (growth / 2**20, bound / 2**20)


def test_memory_does_not_grow_with_globals():
    """32K tokens, 128 -> 512 globals: chunks hold CHUNK_SCORES scores either way, so only
    `[globals, head_dim]` arrays grow: gathered keys and values, selected queries, their
    outputs, cotangents and gradients, allowed 16 of them in float32. One `[seq, globals]`
    float32 array more would be 32 times that."""
    seq = 32768
    growth = _global_pass_temp_bytes(seq, 512) - _global_pass_temp_bytes(seq, 128)
    assert growth <= 16 * _f32_bytes(MEM_HEADS, 512 - 128, MEM_HEAD_DIM), growth / 2**20
