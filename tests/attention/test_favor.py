"""Performer FAVOR+: exact identities against the dense feature product, estimation quality
against softmax attention, the causal future-independence property, and projections."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.favor import GpuBlockSizes, TpuBlockSizes
from longjax.attention import dense_attention, favor_attention, favor_projection
from longjax.attention import favor as favor_lib
from tests.attention import battery

IMPLEMENTATIONS = [
    pytest.param(("xla", {}), id="xla"),
    # The kernels in the Pallas interpreter, in their Triton and Mosaic formulations; a case's
    # chunk_size replaces the causal chunk.
    pytest.param(
        ("pallas", {"interpret": True, "block_sizes": GpuBlockSizes(causal_chunk=8, bidirectional_chunk=8)}),
        id="pallas-gpu",
    ),
    pytest.param(
        ("pallas", {"interpret": True, "block_sizes": TpuBlockSizes(causal_chunk=16, bidirectional_chunk=16)}),
        id="pallas-tpu",
    ),
]
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def _projection(seed, features, head_dim, heads=None):
    p = favor_projection(jax.random.key(seed), features, head_dim)
    if heads is None:
        return p
    return jnp.stack([favor_projection(jax.random.key(seed + h), features, head_dim) for h in range(heads)])


# (shape, options); every case uses 32 features unless it says otherwise.
CASES = {
    "bidirectional": ((2, 23, 2, 8), dict()),
    "bidirectional_per_head_projection": ((1, 19, 3, 8), dict(per_head=True)),
    "causal_default_chunk": ((2, 29, 2, 8), dict(causal=True)),
    "causal_chunk_1": ((1, 17, 2, 8), dict(causal=True, chunk_size=1)),
    "causal_chunk_not_dividing": ((1, 29, 2, 8), dict(causal=True, chunk_size=6)),
    "causal_chunk_longer_than_seq": ((1, 11, 2, 8), dict(causal=True, chunk_size=64)),
    # Several chunks per XLA scan step and several steps, the last one part padding.
    "causal_several_steps": ((1, 300, 2, 8), dict(causal=True, chunk_size=24, padding=(290,))),
    "padding_with_empty_row": ((3, 21, 2, 8), dict(padding=(21, 9, 0))),
    "causal_padding": ((3, 21, 2, 8), dict(causal=True, chunk_size=4, padding=(21, 9, 0))),
    "relu": ((2, 23, 2, 8), dict(feature_map="relu")),
    "relu_causal_padding": ((2, 23, 2, 8), dict(feature_map="relu", causal=True, chunk_size=5, padding=(23, 11))),
}


def _build(case, dtype):
    shape, options = CASES[case]
    options = dict(options)
    batch, seq, heads, dim = shape
    options["projection"] = _projection(5, 32, dim, heads if options.pop("per_head", False) else None)
    if "padding" in options:
        options["padding_mask"] = battery.padding_mask(batch, seq, options.pop("padding"))
    arrays = battery.random_inputs(sum(map(ord, case)), shape, dtype, 3)

    def make(impl, extra):
        return functools.partial(favor_attention, impl=impl, **options, **extra)

    return arrays, make


# Interpreted kernels compile slowly: they run a cross-section here, and against the XLA
# implementation in tests/kernels/test_favor_pallas.py.
SUBSETS = {
    "pallas-gpu": {
        ("causal_chunk_not_dividing", "f32"), ("relu_causal_padding", "bf16"), ("padding_with_empty_row", "bf16"),
    },
    "pallas-tpu": {("bidirectional_per_head_projection", "f32"), ("causal_padding", "bf16")},
}


@pytest.mark.parametrize("implementation, case, dtype", battery.matrix(IMPLEMENTATIONS, CASES, DTYPES, SUBSETS))
def test_matches_dense_feature_product(implementation, case, dtype):
    """Exact identity: the linear-time algebra equals the dense masked feature product."""
    impl, extra = implementation
    arrays, make = _build(case, dtype)
    battery.assert_matches_reference(make(impl, extra), make("reference", {}), arrays)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 128])
def test_causal_output_ignores_the_future(implementation, chunk_size):
    """Changing q, k or v after position i (here: a huge future key) leaves outputs <= i unchanged."""
    impl, extra = implementation
    seq, cut = 24, 13
    q, k, v = battery.random_inputs(21, (1, seq, 2, 8), jnp.float32, 3)
    projection = _projection(2, 64, 8)
    # One compiled program for both inputs: op-by-op dispatch would compile every primitive.
    run = jax.jit(lambda q, k, v: favor_attention(
        q, k, v, projection=projection, causal=True, chunk_size=chunk_size, impl=impl, **extra
    ))
    base = run(q, k, v)
    future = jnp.arange(seq)[None, :, None, None] > cut
    q2, k2, v2 = (jnp.where(future, x * 40.0 + 3.0, x) for x in (q, k, v))
    changed = run(q2, k2, v2)
    np.testing.assert_allclose(changed[:, : cut + 1], base[:, : cut + 1], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(changed))


def test_causal_xla_output_ignores_the_future_across_scan_steps():
    """As above, but bitwise, with the cut inside a chunk of the second of three XLA scan steps of
    several chunks each: neither the carried state nor the in-step states let the future in.
    Doubling the future raises the largest key logit, so a stabiliser taken over the whole
    sequence would move earlier outputs (by about 2e-7 here)."""
    rows, chunk = favor_lib.CAUSAL_STEP_ROWS, 8
    seq, cut = 2 * rows + 3 * chunk + 5, rows + 3 * chunk + 2
    assert rows % chunk == 0 and rows > 2 * chunk
    q, k, v = battery.random_inputs(22, (1, seq, 2, 8), jnp.float32, 3)
    projection = _projection(2, 64, 8)
    run = jax.jit(lambda q, k, v: favor_attention(
        q, k, v, projection=projection, causal=True, chunk_size=chunk, impl="xla"
    ))
    future = jnp.arange(seq)[None, :, None, None] > cut
    base, changed = run(q, k, v), run(*(jnp.where(future, x * 2.0, x) for x in (q, k, v)))
    np.testing.assert_array_equal(changed[:, : cut + 1], base[:, : cut + 1])
    assert np.abs(changed[:, cut + 1 :] - base[:, cut + 1 :]).max() > 0.1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_finite_with_huge_scores(implementation, causal):
    impl, extra = implementation
    q, k, v = battery.random_inputs(4, (1, 40, 2, 16), jnp.float32, 3)
    # |q . k| * scale up to ~1e3.
    q, k = (x * 30.0 for x in (q, k))
    assert float(jnp.max(jnp.abs(jnp.einsum("bqhd,bkhd->bhqk", q, k)))) / 4.0 > 1e3
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    projection = _projection(3, 64, 16)
    fn = lambda q, k, v: favor_attention(q, k, v, projection=projection, causal=causal, chunk_size=8, impl=impl, **extra)
    out = jax.jit(fn)(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_under_jit_and_vmap(implementation):
    impl, extra = implementation
    arrays = battery.random_inputs(8, (3, 18, 2, 8), jnp.float32, 3)
    projection = _projection(1, 16, 8)

    def single(impl_name, extra_options, q, k, v, p):
        return favor_attention(
            q[None], k[None], v[None], projection=projection, causal=True, chunk_size=5,
            padding_mask=p[None], impl=impl_name, **extra_options,
        )[0]

    battery.assert_jit_vmap_matches_reference(
        functools.partial(single, impl, extra), functools.partial(single, "reference", {}),
        arrays, (battery.padding_mask(3, 18, (18, 7, 12)),),
    )


# --- estimation quality against exact softmax attention ----------------------------------------


def _softmax_error(num_features, seed, *, orthogonal=True, causal=False, dtype=jnp.float32):
    return float(_jitted_softmax_error(seed, num_features, orthogonal, causal, jnp.dtype(dtype)))


# One compiled program per setting, run for every seed: the statistical tests take dozens of seeds.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _jitted_softmax_error(seed, num_features, orthogonal, causal, dtype):
    q, k, v = battery.random_inputs(100 + seed, (1, 32, 1, 16), dtype, 3)
    q, k = q * 0.5, k * 0.5
    projection = favor_projection(jax.random.key(seed), num_features, 16, orthogonal=orthogonal).astype(dtype)
    approx = favor_attention(q, k, v, projection=projection, causal=causal, impl="xla")
    mask = jnp.tril(jnp.ones((32, 32), bool)) if causal else jnp.ones((32, 32), bool)
    exact = dense_attention(q, k, v, mask[None, None])
    return jnp.mean(jnp.abs(approx - exact))


@pytest.mark.parametrize("causal", [False, True])
def test_many_features_approach_softmax_attention(causal):
    with jax.enable_x64(True):
        errors = [_softmax_error(8192, seed, causal=causal, dtype=jnp.float64) for seed in range(3)]
    assert max(errors) < 0.01, errors


def test_error_falls_as_features_grow():
    mean_error = {
        m: np.mean([_softmax_error(m, seed) for seed in range(12)]) for m in (8, 32, 128, 512)
    }
    values = list(mean_error.values())
    assert all(a > b for a, b in zip(values, values[1:])), mean_error
    assert values[0] > 3 * values[-1], mean_error


def test_orthogonal_features_beat_iid_on_average():
    # The paper's claim (orthogonal random features reduce the estimator's variance), over 40 seeds
    # with m = d, where it matters most.
    orth = [_softmax_error(16, seed, orthogonal=True) for seed in range(40)]
    iid = [_softmax_error(16, seed, orthogonal=False) for seed in range(40)]
    assert np.mean(orth) < 0.9 * np.mean(iid), (np.mean(orth), np.mean(iid))


# --- projections --------------------------------------------------------------------------------


@pytest.mark.parametrize("features, head_dim", [(16, 16), (40, 16), (7, 16), (64, 8)])
def test_orthogonal_projection_blocks(features, head_dim):
    p = np.asarray(favor_projection(jax.random.key(0), features, head_dim, scaling="sqrt_d"))
    assert p.shape == (features, head_dim)
    np.testing.assert_allclose(np.linalg.norm(p, axis=-1), np.sqrt(head_dim), rtol=1e-5)
    for start in range(0, features, head_dim):
        block = p[start : start + head_dim] / np.sqrt(head_dim)
        np.testing.assert_allclose(block @ block.T, np.eye(len(block)), atol=1e-5)


def test_chi_norms_have_the_chi_distribution():
    head_dim = 16
    p = np.asarray(favor_projection(jax.random.key(1), 4096, head_dim, scaling="chi"))
    norms_sq = np.sum(p**2, axis=-1)
    # chi^2(d): mean d, variance 2d; 4096 samples put the mean within ~0.3 of d.
    assert abs(norms_sq.mean() - head_dim) < 0.5
    assert abs(norms_sq.var() - 2 * head_dim) < 4
    assert np.std(np.linalg.norm(p, axis=-1)) > 0.1  # not all equal


def test_iid_projection_is_not_orthogonal_and_deterministic():
    a = np.asarray(favor_projection(jax.random.key(2), 16, 16, orthogonal=False))
    b = np.asarray(favor_projection(jax.random.key(2), 16, 16, orthogonal=False))
    np.testing.assert_array_equal(a, b)
    gram = a @ a.T / 16
    assert np.max(np.abs(gram - np.diag(np.diag(gram)))) > 0.1


# --- bad input ---------------------------------------------------------------------------------

SHAPE = (1, 10, 2, 8)
BAD = {
    "projection_wrong_dim": (dict(projection=jnp.ones((16, 7))), "projection last dim must equal head_dim"),
    "projection_wrong_rank": (dict(projection=jnp.ones((16,))), "projection must be"),
    "projection_wrong_heads": (dict(projection=jnp.ones((3, 16, 8))), "one entry per head"),
    "projection_int": (dict(projection=jnp.ones((16, 8), jnp.int32)), "projection must be floating"),
    "unknown_feature_map": (dict(feature_map="elu"), "feature_map must be one of"),
    "chunk_zero": (dict(chunk_size=0), "chunk_size must be"),
    "chunk_float": (dict(chunk_size=2.0), "chunk_size must be"),
    "padding_wrong_shape": (dict(padding_mask=jnp.ones((1, 9), bool)), "padding_mask must have shape"),
    "mismatched_dtypes": (dict(v=jnp.ones(SHAPE, jnp.bfloat16)), "same dtype"),
    "unknown_impl": (dict(impl="fast"), "impl must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    overrides = dict(BAD[case][0])
    q = jnp.ones(SHAPE)
    v = overrides.pop("v", q)
    options = dict(projection=jnp.ones((16, 8)))
    options.update(overrides)
    with pytest.raises(ValueError, match=BAD[case][1]):
        favor_attention(q, q, v, **options)


def test_projection_bad_arguments():
    with pytest.raises(ValueError, match="num_features"):
        favor_projection(jax.random.key(0), 0, 8)
    with pytest.raises(ValueError, match="scaling"):
        favor_projection(jax.random.key(0), 8, 8, scaling="unit")


def test_kernel_options_are_refused_by_other_implementations():
    for impl in ("xla", "reference"):
        with pytest.raises(NotImplementedError, match="block_sizes: options of impl='pallas' only"):
            favor_attention(
                *(jnp.ones(SHAPE),) * 3, projection=jnp.ones((16, 8)), impl=impl, block_sizes=GpuBlockSizes()
            )


def test_pallas_refuses_a_chunk_its_compiled_kernels_cannot_take():
    # impl=None would then fall back to XLA, which takes any chunk.
    with pytest.raises(NotImplementedError, match="chunk_size=6"):
        favor_attention(
            *(jnp.ones(SHAPE),) * 3, projection=jnp.ones((16, 8)), causal=True, chunk_size=6, impl="pallas",
            interpret=False,
        )


def test_a_program_drawing_many_projections_finishes():
    """A model's Performer layers each draw their projection inside the train step. XLA:CPU's
    batched QR waits on tasks it queues on the pool it runs on, so 8 or more batched QRs in one
    program deadlocked a 2-core machine; each block now has its own QR. In a subprocess, so a
    deadlock fails here within minutes instead of hanging the suite."""
    code = (
        "import jax\n"
        "from longjax.attention import favor_projection\n"
        "draw = jax.jit(lambda key: [favor_projection(jax.random.fold_in(key, i), 256, 64) for i in range(16)])\n"
        "jax.block_until_ready(draw(jax.random.key(0)))\n"
        "print('drawn')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0 and "drawn" in result.stdout, result.stderr[-2000:]
