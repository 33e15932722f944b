"""The sliding-window (Longformer) battery: every implementation against the dense reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes, dot_operand_dtype
from longjax.attention import sliding_window_attention
from longjax.attention.relative import RelativePositions, sliding_window_reach
from tests.attention import battery

# Each entry: (impl, extra options). A Pallas implementation joins here.
IMPLEMENTATIONS = [
    pytest.param(("xla", {}), id="xla"),
    # Tiny blocks put several blocks and every span edge case into small shapes.
    pytest.param(("xla", {"block_size": 4}), id="xla-block4"),
    # The kernels in the Pallas interpreter, in their Triton and Mosaic formulations; tiny
    # blocks (query and key blocks of different lengths) give full and partial visits.
    pytest.param(("pallas", {"interpret": True, "block_sizes": GpuBlockSizes(8, 4, 4, 8)}), id="pallas-gpu"),
    pytest.param(("pallas", {"interpret": True, "block_sizes": TpuBlockSizes(8, 16, 16, 8)}), id="pallas-tpu"),
]
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def _dot_dtype(impl, extra, dtype):
    """The matmul operand dtype of an implementation (the Triton kernels take float32 as bfloat16)."""
    return dot_operand_dtype(extra["block_sizes"], dtype) if impl == "pallas" else None


# (shape [batch, seq, heads, head_dim], options). Globals and padding are built per case.
CASES = {
    "seq_not_multiple": ((2, 37, 2, 8), dict(window=3)),
    "seq_shorter_than_window": ((1, 10, 2, 8), dict(window=16)),
    "window_zero": ((1, 13, 2, 8), dict(window=0)),
    "asymmetric": ((1, 29, 2, 8), dict(window=(2, 5))),
    "asymmetric_left_only": ((1, 29, 2, 8), dict(window=(6, 0))),
    "asymmetric_right_only": ((1, 29, 2, 8), dict(window=(0, 4))),
    "causal": ((2, 31, 2, 8), dict(window=5, causal=True)),
    "dilation_per_head": ((1, 41, 4, 8), dict(window=3, dilation=(1, 2, 3, 1))),
    "dilation_causal": ((1, 33, 2, 8), dict(window=(4, 0), dilation=(2, 3), causal=True)),
    "dilation_beyond_seq": ((1, 9, 2, 8), dict(window=2, dilation=(5, 11))),
    "globals": ((2, 35, 2, 8), dict(window=2, global_mask=((0, 17, 34), (9,)))),
    "globals_in_window": ((1, 30, 2, 8), dict(window=4, global_mask=((10, 11, 13),))),
    "globals_separate_qkv": (
        (2, 35, 2, 8), dict(window=2, global_mask=((0, 20), (3, 4, 30)), separate_global_qkv=True)
    ),
    "causal_globals": ((2, 34, 2, 8), dict(window=3, causal=True, global_mask=((0, 12, 30), (5,)))),
    "causal_globals_qkv_dilation": (
        (2, 34, 2, 8),
        dict(window=3, causal=True, dilation=(1, 2), global_mask=((0, 12), (5, 33)),
             separate_global_qkv=True),
    ),
    "padding_with_empty_row": ((3, 27, 2, 8), dict(window=3, padding=(27, 15, 0))),
    "padding_globals": (
        (3, 27, 2, 8),
        dict(window=3, padding=(20, 27, 0), global_mask=((1, 22), (0, 26), (4,)),
             separate_global_qkv=True),
    ),
    # Transformer-XL relative positions: `relative=n` gives a table n offsets wider than the reach.
    "relative": ((2, 37, 2, 8), dict(window=3, relative=0)),
    "relative_causal": ((2, 31, 2, 8), dict(window=5, causal=True, relative=2)),
    "relative_asymmetric_dilation": ((1, 41, 4, 8), dict(window=(2, 5), dilation=(1, 2, 3, 1), relative=0)),
    "relative_causal_dilation": ((1, 33, 2, 8), dict(window=(4, 0), dilation=(2, 3), causal=True, relative=1)),
    "relative_padding_beyond_window": ((3, 10, 2, 8), dict(window=16, padding=(10, 6, 0), relative=30)),
}


def _build(case: str, dtype):
    """Returns (arrays, fn(impl, options) -> callable on arrays, reference callable)."""
    shape, options = CASES[case]
    options = dict(options)
    batch, seq = shape[:2]
    separate = options.pop("separate_global_qkv", False)
    extra_offsets = options.pop("relative", None)
    if "global_mask" in options:
        options["global_mask"] = battery.token_mask(batch, seq, options["global_mask"])
    if "padding" in options:
        options["padding_mask"] = battery.padding_mask(batch, seq, options.pop("padding"))
    arrays = battery.random_inputs(sum(map(ord, case)), shape, dtype, 6 if separate else 3)
    if extra_offsets is not None:
        spec_reach = sliding_window_reach(*_window_sides(options), options.get("dilation", (1,)), seq)
        arrays += battery.relative_inputs(sum(map(ord, case)) + 7, shape, dtype, max_offset=spec_reach + extra_offsets)

    def make(impl, extra):
        def fn(q, k, v, *rest):
            kwargs = dict(options)
            if extra_offsets is not None:
                kwargs["relative"] = RelativePositions(*rest)
            elif rest:
                kwargs["global_qkv"] = rest
            return sliding_window_attention(q, k, v, impl=impl, **kwargs, **extra)

        return fn

    return arrays, make


def _window_sides(options):
    window = options["window"]
    if isinstance(window, tuple):
        return window
    return window, 0 if options.get("causal") else window


# Interpreted kernels compile slowly, so they run a cross-section that still covers every
# option: the Triton formulation most cases, the Mosaic one a few (the kernel math is shared).
SUBSETS = {
    "pallas-gpu": {
        ("seq_not_multiple", "f32"), ("seq_shorter_than_window", "f32"), ("window_zero", "f32"),
        ("asymmetric", "f32"), ("causal", "f32"), ("dilation_per_head", "f32"), ("dilation_beyond_seq", "f32"),
        ("globals_in_window", "f32"), ("causal_globals_qkv_dilation", "f32"), ("padding_with_empty_row", "f32"),
        ("padding_globals", "f32"), ("causal", "bf16"), ("globals_separate_qkv", "bf16"),
        ("relative", "f32"), ("relative_causal", "f32"), ("relative_asymmetric_dilation", "f32"),
        ("relative_padding_beyond_window", "f32"), ("relative_causal", "bf16"),
    },
    "pallas-tpu": {
        ("asymmetric_right_only", "f32"), ("dilation_causal", "f32"), ("padding_globals", "f32"), ("causal", "bf16"),
        ("relative_causal", "f32"), ("relative_asymmetric_dilation", "f32"), ("relative_causal_dilation", "bf16"),
        ("relative_padding_beyond_window", "f32"),
    },
}


@pytest.mark.parametrize("implementation, case, dtype", battery.matrix(IMPLEMENTATIONS, CASES, DTYPES, SUBSETS))
def test_matches_reference(implementation, case, dtype):
    impl, extra = implementation
    arrays, make = _build(case, dtype)
    battery.assert_matches_reference(
        make(impl, extra), make("reference", {}), arrays, dot_dtype=_dot_dtype(impl, extra, dtype)
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_under_jit_and_vmap(implementation):
    impl, extra = implementation
    batch, seq, heads, dim = 3, 26, 2, 8
    arrays = battery.random_inputs(7, (batch, seq, heads, dim), jnp.float32, 3)
    masks = (
        battery.token_mask(batch, seq, ((0,), (3, 20), ())),
        battery.padding_mask(batch, seq, (26, 22, 10)),
    )

    def single(impl_name, extra_options, q, k, v, g, p):
        # vmap strips the batch axis; the op wants it, so each example is a batch of one.
        out = sliding_window_attention(
            q[None], k[None], v[None], window=3, dilation=(1, 2), global_mask=g[None],
            padding_mask=p[None], max_global_tokens=2, impl=impl_name, **extra_options,
        )
        return out[0]

    battery.assert_jit_vmap_matches_reference(
        functools.partial(single, impl, extra), functools.partial(single, "reference", {}), arrays, masks,
        dot_dtype=_dot_dtype(impl, extra, jnp.float32),
    )


@st.composite
def _problems(draw):
    batch = draw(st.integers(1, 2))
    seq = draw(st.integers(1, 40))
    heads = draw(st.integers(1, 3))
    causal = draw(st.booleans())
    left = draw(st.integers(0, 12))
    right = 0 if causal else draw(st.integers(0, 12))
    window = left if (causal or left == right) and draw(st.booleans()) else (left, right)
    dilation = tuple(draw(st.lists(st.integers(1, 4), min_size=heads, max_size=heads)))
    bits = st.lists(st.booleans(), min_size=seq, max_size=seq)
    global_mask = padding_mask = None
    if draw(st.booleans()):
        global_mask = jnp.asarray([draw(bits) for _ in range(batch)])
    if draw(st.booleans()):
        padding_mask = jnp.asarray([draw(bits) for _ in range(batch)])
    block_size = draw(st.sampled_from([None, 1, 3, 8]))
    seed = draw(st.integers(0, 2**16))
    # Relative positions reach only the window's offsets, so they come without global tokens.
    relative_offsets = None
    if global_mask is None and draw(st.booleans()):
        relative_offsets = max(dilation) * max(left, right) + draw(st.integers(0, 3))
    return (batch, seq, heads), dict(
        window=window, dilation=dilation, causal=causal, global_mask=global_mask,
        padding_mask=padding_mask,
    ), block_size, relative_offsets, seed


@settings(max_examples=40)
@given(_problems())
def test_property_matches_reference(problem):
    (batch, seq, heads), options, block_size, relative_offsets, seed = problem
    shape = (batch, seq, heads, 4)
    q, k, v = battery.random_inputs(seed, shape, jnp.float32, 3)
    if relative_offsets is not None:
        options["relative"] = RelativePositions(*battery.relative_inputs(seed + 3, shape, jnp.float32, max_offset=relative_offsets))
    fast = functools.partial(sliding_window_attention, impl="xla", block_size=block_size, **options)
    ref = functools.partial(sliding_window_attention, impl="reference", **options)
    battery.assert_matches_reference(fast, ref, (q, k, v), check_grads=False)


def test_relative_table_shorter_than_the_window_is_an_error_naming_it():
    q, k, v = battery.random_inputs(0, (1, 20, 2, 4), jnp.float32, 3)
    relative = RelativePositions(*battery.relative_inputs(1, q.shape, jnp.float32, max_offset=5))
    with pytest.raises(ValueError, match=r"relative.embeddings covers offsets up to 5.*up to 6"):
        sliding_window_attention(q, k, v, window=(3, 0), dilation=2, causal=True, relative=relative, impl="xla")
    with pytest.raises(ValueError, match=r"relative.queries must have q's shape"):
        sliding_window_attention(q, k, v, window=2, relative=RelativePositions(q[:, :10], relative.embeddings))
    with pytest.raises(ValueError, match=r"relative.embeddings must be \[2 \* max_offset \+ 1"):
        sliding_window_attention(q, k, v, window=2, relative=RelativePositions(q, relative.embeddings[1:]))


def test_relative_with_global_tokens_is_refused_by_every_implementation():
    q, k, v = battery.random_inputs(0, (1, 20, 2, 4), jnp.float32, 3)
    relative = RelativePositions(*battery.relative_inputs(1, q.shape, jnp.float32, max_offset=19))
    for impl in ("xla", "reference", None):
        with pytest.raises(NotImplementedError, match="relative with global_mask"):
            sliding_window_attention(
                q, k, v, window=2, global_mask=battery.token_mask(1, 20, ((3,),)), relative=relative, impl=impl
            )


def test_relative_offsets_beyond_the_window_do_not_matter():
    # Only the table rows of offsets the window attends may enter the result.
    q, k, v = battery.random_inputs(4, (1, 30, 2, 4), jnp.float32, 3)
    queries, table = battery.relative_inputs(5, q.shape, jnp.float32, max_offset=12)
    attend = lambda table: sliding_window_attention(
        q, k, v, window=(4, 2), relative=RelativePositions(queries, table), impl="xla"
    )
    outside = (np.arange(25) - 12 > 4) | (np.arange(25) - 12 < -2)
    scrambled = jnp.where(outside[:, None, None], 1e3, table)
    np.testing.assert_array_equal(attend(table), attend(scrambled))


def test_too_many_globals_is_nan_not_wrong():
    q, k, v = battery.random_inputs(3, (2, 16, 1, 4), jnp.float32, 3)
    global_mask = battery.token_mask(2, 16, ((1, 5, 9), (2,)))
    out = jax.jit(
        lambda q, k, v, g: sliding_window_attention(
            q, k, v, window=2, global_mask=g, max_global_tokens=2, impl="xla"
        )
    )(q, k, v, global_mask)
    assert np.all(np.isnan(out[0]))
    ref = sliding_window_attention(q, k, v, window=2, global_mask=global_mask, impl="reference")
    np.testing.assert_allclose(out[1], ref[1], **battery.TOLERANCES[jnp.dtype(jnp.float32)])


def test_no_seq_by_seq_array_in_xla_program():
    seq = 4096
    q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, seq), jnp.bool_)
    fn = lambda q, k, v, g, p: sliding_window_attention(
        q, k, v, window=8, dilation=(1, 3), global_mask=g, padding_mask=p,
        max_global_tokens=4, impl="xla",
    )
    grad = jax.grad(lambda q, k, v, g, p: jnp.sum(fn(q, k, v, g, p)), (0, 1, 2))
    for f in (fn, grad):
        text = jax.jit(f).lower(q, q, q, mask, mask).as_text()
        # Any array with two sequence-length axes would show as seqxseq in the HLO types.
        assert f"{seq}x{seq}" not in text
        assert f"{seq // 3 + 1}x{seq // 3 + 1}" not in text


def test_output_of_padded_query_is_zero_and_finite():
    q, k, v = battery.random_inputs(5, (2, 12, 2, 4), jnp.float32, 3)
    padding_mask = battery.padding_mask(2, 12, (0, 5))
    out = sliding_window_attention(q, k, v, window=2, padding_mask=padding_mask, impl="xla")
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(out[1, 5:]) == 0)
    grads = jax.grad(
        lambda q: jnp.sum(sliding_window_attention(q, k, v, window=2, padding_mask=padding_mask))
    )(q)
    assert np.all(np.isfinite(grads))


def test_default_impl_is_exact():
    q, k, v = battery.random_inputs(9, (1, 20, 2, 8), jnp.float32, 3)
    np.testing.assert_allclose(
        sliding_window_attention(q, k, v, window=3),
        sliding_window_attention(q, k, v, window=3, impl="reference"),
        **battery.TOLERANCES[jnp.dtype(jnp.float32)],
    )


@pytest.mark.parametrize(
    "block_sizes", [GpuBlockSizes(8, 4, 4, 8), TpuBlockSizes(8, 16, 16, 8)], ids=["pallas-gpu", "pallas-tpu"]
)
def test_relative_on_the_kernels_keeps_the_queries_not_the_bias(block_sizes):
    # The kernels' float32 banded bias (left + right + 1 = 30 columns a query) is recomputed in the
    # backward pass: between the passes the gradient keeps the position queries and the table.
    q, k, v = battery.random_inputs(6, (1, 61, 2, 8), jnp.float32, 3)
    queries, table = battery.relative_inputs(7, q.shape, jnp.float32, max_offset=20)
    op = lambda q, k, v, queries, table: sliding_window_attention(
        q, k, v, window=(20, 9), relative=RelativePositions(queries, table), impl="pallas", interpret=True,
        block_sizes=block_sizes,
    )
    _, backward = jax.vjp(op, q, k, v, queries, table)
    saved = jax.tree_util.tree_leaves(backward)
    assert not [x.shape for x in saved if x.ndim == 4 and x.shape[-1] == 30]
    assert any(x.shape == table.shape for x in saved)


def test_relative_on_mosaic_tiles_wider_than_the_bias_rows():
    # A 9-column band (window 4) whose tiles are 256 columns: a 256-key compute block in the
    # forward and dq kernels, a 256-query block in dk/dv. The bias rows widen to the tile.
    block_sizes = TpuBlockSizes(256, 256, 256, 256, 256)
    shape = (1, 264, 2, 8)
    arrays = battery.random_inputs(8, shape, jnp.float32, 3) + battery.relative_inputs(9, shape, jnp.float32, max_offset=4)

    def make(impl, extra):
        return lambda q, k, v, queries, table: sliding_window_attention(
            q, k, v, window=4, relative=RelativePositions(queries, table), impl=impl, **extra
        )

    battery.assert_matches_reference(
        make("pallas", {"interpret": True, "block_sizes": block_sizes}), make("reference", {}), arrays
    )
