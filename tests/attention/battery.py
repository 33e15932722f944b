"""The shared attention test battery: any implementation against the reference.

`assert_matches_reference` compares the output and the gradients of every
floating-point input (q, k, v and any extra ones such as global projections)
of an implementation with those of the reference, with the fixed per-dtype
tolerances below. Tolerances are written once and never loosened to pass.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Inputs are unit normals, so outputs and gradients are O(1).
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}

# Float32 inputs through matmuls with bfloat16 operands and float32 accumulation (the
# Triton block-sparse kernels' float32 mode, as FlashAttention's). bfloat16 rounds to
# nearest with 8 significant bits: a relative error u <= 2^-8 per operand, so <= 2u per
# product, with sums, statistics and outputs exact to float32. The longest chain, a
# gradient (scores q.k -> p; dp = do.v -> ds; ds.k or ds.q), passes three such dots, each
# adding up to 2u of the O(1) magnitudes involved: 6u. Measured on the kernel tests: up to
# 3.4u. Deliberately not the bfloat16-input tolerance: outputs here are not rounded to bf16.
BF16_DOTS_TOLERANCE = dict(atol=6 * 2**-8, rtol=6 * 2**-8)


def tolerance(dtype, dot_dtype=None):
    """The fixed tolerance for results computed from `dtype` inputs whose matmul operands are `dot_dtype`.

    `dot_dtype` None: the inputs' dtype. Float32 inputs with bfloat16 operands get
    `BF16_DOTS_TOLERANCE`; every other case the per-dtype `TOLERANCES`.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32 and dot_dtype is not None and jnp.dtype(dot_dtype) == jnp.bfloat16:
        return BF16_DOTS_TOLERANCE
    return TOLERANCES[dtype]


def random_inputs(seed: int, shape, dtype, count: int):
    keys = jax.random.split(jax.random.key(seed), count)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys)


def relative_inputs(seed: int, shape, dtype, *, max_offset: int):
    """Transformer-XL position inputs for q of `shape`: position queries shaped like q and a table
    of `2 * max_offset + 1` offset embeddings (`relative.RelativePositions`)."""
    queries, = random_inputs(seed, shape, dtype, 1)
    table, = random_inputs(seed + 1, (2 * max_offset + 1,) + tuple(shape[2:]), dtype, 1)
    return queries, table


def value_and_grads(fn, arrays, cotangent):
    """Output of `fn(*arrays)` and the gradients of `sum(out * cotangent)` wrt every array."""

    def loss(*xs):
        out = fn(*xs)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(arrays))), has_aux=True)(
        *arrays
    )
    return out, grads


def assert_matches_reference(
    fn, reference_fn, arrays, *, seed: int = 0, check_grads: bool = True, dot_dtype=None
):
    """Asserts fn and reference_fn agree in value (and gradients) at `arrays`.

    `dot_dtype`: the dtype fn's matmuls cast their operands to (None: the inputs'), which
    selects the tolerance (`tolerance`).
    """
    dtype = jnp.dtype(arrays[0].dtype)
    tol = tolerance(dtype, dot_dtype)
    if not check_grads:
        out, ref = jax.jit(fn)(*arrays), jax.jit(reference_fn)(*arrays)
        chex.assert_equal_shape([out, ref])
        chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), **tol)
        return
    cotangent = jax.random.normal(jax.random.key(seed + 1), arrays[0].shape, jnp.float32)
    # One compiled program per side: op-by-op dispatch would compile every primitive.
    out, grads = jax.jit(functools.partial(value_and_grads, fn))(arrays, cotangent)
    ref, ref_grads = jax.jit(functools.partial(value_and_grads, reference_fn))(arrays, cotangent)
    chex.assert_equal_shape([out, ref])
    assert out.dtype == ref.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32))), "output has NaN or Inf"
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), **tol)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), f"gradient {i} has NaN or Inf"
        chex.assert_trees_all_close(
            g.astype(jnp.float32), rg.astype(jnp.float32), **tol,
            custom_message=f"gradient wrt input {i}",
        )


def matrix(implementations, cases, dtypes, subsets):
    """pytest params `(implementation, case, dtype)` for a battery.

    Every combination, except that an implementation whose id is in `subsets`
    (one slow to compile, such as an interpreted kernel) runs only its listed
    `(case, dtype id)` pairs.
    """
    return [
        pytest.param(impl.values[0], case, dtype.values[0], id=f"{impl.id}-{case}-{dtype.id}")
        for impl in implementations
        for case in cases
        for dtype in dtypes
        if impl.id not in subsets or (case, dtype.id) in subsets[impl.id]
    ]


def token_mask(batch: int, seq: int, positions_per_row):
    """bool `[batch, seq]`, True at the listed positions of each row."""
    mask = np.zeros((batch, seq), bool)
    for row, positions in enumerate(positions_per_row):
        mask[row, list(positions)] = True
    return jnp.asarray(mask)


def padding_mask(batch: int, seq: int, lengths):
    """bool `[batch, seq]`, True for the first `lengths[row]` tokens of each row."""
    return jnp.asarray(np.arange(seq)[None, :] < np.asarray(lengths)[:, None])


def assert_jit_vmap_matches_reference(single, reference_single, arrays, masks, *, dot_dtype=None):
    """`jit(vmap(single))` against `vmap(reference_single)`, values and gradients.

    Both take one example, `(q, k, v, *masks) -> out` without the batch axis,
    which vmap adds back. Gradients are wrt the float arrays (float32); the
    tolerance is float32's, or `BF16_DOTS_TOLERANCE` when `dot_dtype` is bfloat16.
    """
    tol = tolerance(jnp.float32, dot_dtype)
    fast, ref = jax.jit(jax.vmap(single)), jax.vmap(reference_single)
    np.testing.assert_allclose(fast(*arrays, *masks), ref(*arrays, *masks), **tol)
    grad = lambda f: jax.grad(lambda *xs: jnp.sum(f(*xs, *masks) ** 2), tuple(range(len(arrays))))
    for g, rg in zip(jax.jit(grad(fast))(*arrays), grad(ref)(*arrays)):
        np.testing.assert_allclose(g, rg, **tol)
