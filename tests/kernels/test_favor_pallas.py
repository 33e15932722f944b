"""The Pallas FAVOR+ kernels in interpret mode, in their Triton and Mosaic formulations,
against the XLA implementation (same stabilisers, so equal to rounding), and their options."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import favor as favor_kernels
from kernels_pallas.favor import GpuBlockSizes, TpuBlockSizes
from longjax.attention import favor as favor_lib
from longjax.attention import favor_attention, favor_projection
from tests.attention import battery

BLOCKS = {"gpu": GpuBlockSizes, "tpu": TpuBlockSizes}


def _projection(seed, features, head_dim, heads=None):
    if heads is None:
        return favor_projection(jax.random.key(seed), features, head_dim)
    return jnp.stack([favor_projection(jax.random.key(seed + h), features, head_dim) for h in range(heads)])


# (shape, options, chunk). Features are 32 unless given: 24 is padded to the
# backend's tile (16 -> 32 on GPU, 128 on TPU), head_dim 12 to 16 on GPU.
CASES = {
    "causal_seq_not_multiple": ((2, 29, 2, 8), dict(causal=True), 8),
    "causal_chunk_1": ((1, 9, 2, 8), dict(causal=True), 1),
    "causal_padding_empty_row": ((3, 21, 2, 8), dict(causal=True, padding=(21, 9, 0)), 4),
    "causal_relu_padding": ((2, 23, 2, 8), dict(causal=True, feature_map="relu", padding=(23, 11)), 5),
    "causal_padded_dims_projection_grad": (
        (2, 19, 2, 12), dict(causal=True, features=24, per_head=True, projection_grad=True), 8,
    ),
    "causal_relu_projection_grad": ((1, 21, 2, 8), dict(causal=True, feature_map="relu", projection_grad=True), 8),
    "causal_bf16": ((1, 40, 2, 16), dict(causal=True, dtype=jnp.bfloat16), 16),
    "bidirectional_padding_empty_row": ((3, 21, 2, 8), dict(padding=(21, 9, 0)), 8),
    "bidirectional_per_head_projection_grad": (
        (1, 19, 3, 12), dict(per_head=True, features=24, projection_grad=True), 4,
    ),
    "bidirectional_relu": ((2, 23, 2, 8), dict(feature_map="relu", padding=(23, 7)), 8),
    "bidirectional_bf16": ((1, 40, 2, 16), dict(dtype=jnp.bfloat16), 16),
}
# Both formulations share the chunk math, so the Mosaic one runs a cross-section.
TPU_CASES = ("causal_seq_not_multiple", "causal_padded_dims_projection_grad",
             "bidirectional_per_head_projection_grad", "bidirectional_relu")
MATRIX = [pytest.param("gpu", case, id=f"gpu-{case}") for case in CASES] + [
    pytest.param("tpu", case, id=f"tpu-{case}") for case in TPU_CASES
]


@pytest.mark.parametrize("backend, case", MATRIX)
def test_matches_xla_implementation(backend, case):
    """Outputs and gradients (the projection's too where marked) equal favor_xla's for the same
    projection, several chunk sizes, seq not a multiple of the chunk, padding, bfloat16."""
    shape, options, chunk = CASES[case]
    options = dict(options)
    batch, seq, heads, dim = shape
    dtype = options.pop("dtype", jnp.float32)
    heads_of_projection = heads if options.pop("per_head", False) else None
    projection = _projection(3, options.pop("features", 32), dim, heads_of_projection)
    padding = options.pop("padding", None)
    mask = None if padding is None else battery.padding_mask(batch, seq, padding)
    projection_grad = options.pop("projection_grad", False)
    blocks = BLOCKS[backend](causal_chunk=chunk, bidirectional_chunk=chunk)
    if backend == "gpu":
        # Two feature tiles (the second half padding where features=24): the loop over tiles,
        # and the reductions over all of them, are what is checked.
        blocks = dataclasses.replace(blocks, feature_tile=16)
    common = dict(feature_map="softmax", padding_mask=mask, scale=None) | options

    def kernel(q, k, v, p):
        return favor_kernels.favor_attention_pallas(
            q, k, v, projection=p, block_sizes=blocks, interpret=True, **common
        )

    def xla(q, k, v, p):
        return favor_lib.favor_xla(q, k, v, projection=p, chunk_size=chunk, **{"causal": False} | common)

    arrays = battery.random_inputs(sum(map(ord, case)), shape, dtype, 3)
    if projection_grad:
        battery.assert_matches_reference(kernel, xla, arrays + (projection,))
    else:
        battery.assert_matches_reference(lambda *x: kernel(*x, projection), lambda *x: xla(*x, projection), arrays)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_no_feature_array_reaches_memory(backend, causal):
    """Outside the kernels, nothing of the forward or backward pass has both a sequence axis and a
    feature axis: features and per-position states exist only inside the kernels. (The per-chunk
    states `[chunks, features, head_dim]` and their scans are outside, by design.)"""
    seq, features, heads, dim = 96, 48, 2, 8
    q = jnp.ones((1, seq, heads, dim))
    blocks = BLOCKS[backend](causal_chunk=16, bidirectional_chunk=16)
    fn = lambda q, k, v, p: favor_kernels.favor_attention_pallas(
        q, k, v, projection=p, causal=causal, interpret=True, block_sizes=blocks
    )
    loss = lambda *xs: jnp.sum(fn(*xs))
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1, 2, 3)))(q, q, q, _projection(0, features, dim))
    # The kernels pad features to the backend's tiles (GPU: 64 here, TPU: 128); the sequence is a
    # whole number of chunks already.
    feature_sizes = {features, 64, 128}
    kernels, per_position_features = 0, []

    def visit(jaxpr):
        nonlocal kernels
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                kernels += 1
                continue  # the kernel body is where features may live
            for var in eqn.outvars:
                shape = tuple(getattr(var.aval, "shape", ()))
                if seq in shape and feature_sizes & set(shape):
                    per_position_features.append((eqn.primitive.name, shape))
            for sub in _subjaxprs(eqn):
                visit(sub)

    visit(jaxpr.jaxpr)
    # Causal: chunk states, forward; chunk states, per-row terms, dq, dk/dv. Bidirectional: key
    # states, queries; query gradients, key gradients.
    assert kernels == (6 if causal else 4)
    assert not per_position_features, per_position_features


def _subjaxprs(eqn):
    """The jaxprs inside an equation's parameters (jit, cond and loop bodies, ...)."""
    for param in eqn.params.values():
        for value in param if isinstance(param, (tuple, list)) else (param,):
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr holds a Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


# --- options ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _OtherFamilyBlockSizes:
    block_q: int = 64


def _call(**options):
    """The op with impl='pallas': its checks, the implementation's (`pallas_favor`), the kernels'."""
    q = jnp.ones((1, 10, 2, 8))
    return favor_attention(q, q, q, projection=jnp.ones((16, 8)), impl="pallas", **options)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GpuBlockSizes(causal_chunk=0), "GpuBlockSizes.causal_chunk must be an int >= 1"),
        (lambda: TpuBlockSizes(bidirectional_chunk=2.0), "TpuBlockSizes.bidirectional_chunk must be an int >= 1"),
        (lambda: GpuBlockSizes(num_warps=6), "num_warps must be a power of two"),
        (lambda: GpuBlockSizes(num_stages=0), "num_stages must be an int >= 1"),
        (lambda: GpuBlockSizes(feature_tile=48), "feature_tile must be a power of two >= 16"),
    ],
)
def test_block_sizes_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(block_sizes=GpuBlockSizes(causal_chunk=24)), ValueError, "power of two >= 16 for the compiled"),
        (dict(block_sizes=TpuBlockSizes(bidirectional_chunk=8)), ValueError, "multiple of 16 for the compiled"),
        (dict(block_sizes=_OtherFamilyBlockSizes()), ValueError, "kernels_pallas.favor.GpuBlockSizes"),
        (dict(interpret="yes"), ValueError, "interpret must be None, True or False"),
        (dict(causal=True, chunk_size=6), NotImplementedError, "chunk_size=6"),
    ],
)
def test_bad_options_name_the_argument(options, error, message):
    options.setdefault("interpret", False)
    with pytest.raises(error, match=message):
        _call(**options)


def test_chunk_size_replaces_the_causal_chunk():
    q, k, v = battery.random_inputs(0, (1, 21, 2, 8), jnp.float32, 3)
    projection = _projection(1, 16, 8)
    run = lambda **options: favor_kernels.favor_attention_pallas(
        q, k, v, projection=projection, causal=True, interpret=True, **options
    )
    blocks = GpuBlockSizes(causal_chunk=4)
    given = run(block_sizes=dataclasses.replace(blocks, causal_chunk=16))
    np.testing.assert_array_equal(run(block_sizes=blocks, chunk_size=16), given)


def test_compiled_kernels_are_refused_on_cpu():
    """Without interpret mode and without block sizes, the platform picks the lowering; Pallas
    refuses CPU rather than anything running silently in its place."""
    with pytest.raises(Exception, match="interpret"):
        jax.block_until_ready(jax.jit(lambda: _call(interpret=False))())


def test_triton_refuses_heads_wider_than_its_register_state():
    q = jnp.zeros((1, 64, 1, 576), jnp.bfloat16)
    projection = favor_projection(jax.random.key(0), 32, 576)
    with pytest.raises(NotImplementedError, match="head_dim up to 128, got 576"):
        jax.eval_shape(
            lambda q: favor_kernels.favor_attention_pallas(
                q, q, q, projection=projection, causal=True, interpret=False, block_sizes=GpuBlockSizes()
            ),
            q,
        )
