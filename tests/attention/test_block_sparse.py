"""The block-sparse (BigBird) battery: every implementation against the dense reference,
and the guarantees of the random layout generator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes, dot_operand_dtype
from longjax.attention import RelativePositions, bigbird_random_layout, block_sparse_attention
from tests.attention import battery

# Each entry: (impl, extra options). A Pallas implementation joins here.
IMPLEMENTATIONS = [
    pytest.param(("xla", {}), id="xla"),
    # The kernels in the Pallas interpreter, in their Triton and Mosaic formulations. Kernel
    # blocks shorter than the BigBird block give several visits per block pair; the Mosaic
    # formulation puts 4-token blocks in 8-position slots.
    pytest.param(("pallas", {"interpret": True, "block_sizes": GpuBlockSizes(8, 4, 4, 8)}), id="pallas-gpu"),
    pytest.param(("pallas", {"interpret": True, "block_sizes": TpuBlockSizes(8, 8, 8, 8)}), id="pallas-tpu"),
]
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16")]


def _dot_dtype(impl, extra, dtype):
    """The matmul operand dtype of an implementation (the Triton kernels take float32 as bfloat16)."""
    return dot_operand_dtype(extra["block_sizes"], dtype) if impl == "pallas" else None


def _given_layout(heads, blocks, r):
    """A hand-written layout with a repeat, an entry inside the window and a -1."""
    layout = np.full((heads, blocks, r), -1, np.int32)
    for h in range(heads):
        for a in range(blocks):
            layout[h, a] = [(a + 3 + h) % blocks, (a + 3 + h) % blocks, a][:r]
    return layout


# (shape [batch, seq, heads, head_dim], options).
CASES = {
    "itc_defaults": ((2, 48, 2, 8), dict(block_size=4)),
    "seq_not_multiple_of_block": ((1, 45, 2, 8), dict(block_size=4)),
    "short_sequence": ((1, 7, 2, 8), dict(block_size=4)),
    "single_block": ((1, 5, 2, 8), dict(block_size=8)),
    "other_global_blocks": ((1, 40, 2, 8), dict(block_size=4, global_blocks=(3, -3), num_random_blocks=2)),
    "no_globals_wide_window": ((1, 40, 2, 8), dict(block_size=4, global_blocks=(), num_window_blocks=5)),
    "given_layout": ((1, 36, 2, 8), dict(block_size=4, random_layout=_given_layout(2, 9, 3))),
    "causal": ((2, 41, 2, 8), dict(block_size=4, causal=True)),
    "causal_given_layout": ((1, 36, 2, 8), dict(block_size=4, causal=True, random_layout=_given_layout(2, 9, 3))),
    "padding_with_empty_row": ((3, 40, 2, 8), dict(block_size=4, padding=(40, 17, 0))),
    "global_mask": ((2, 40, 2, 8), dict(block_size=4, global_mask=((5, 22), (13,)))),
    "causal_global_mask_padding": (
        (2, 40, 2, 8), dict(block_size=4, causal=True, global_mask=((5, 22), (13, 38)), padding=(40, 30))
    ),
    "block_size_not_power_of_two": ((1, 45, 2, 8), dict(block_size=6, causal=True, padding=(41,))),
    # Token-level globals inside the global blocks (0 and 9: tokens 0-3 and 36-39), whose last one
    # is part padding in row 1: each global key must count once, whichever pass attends it.
    "global_mask_in_global_blocks": (
        (2, 40, 2, 8), dict(block_size=4, global_mask=((1, 22), (13, 37)), padding=(40, 38))
    ),
    # Transformer-XL relative positions (impl='xla', the Triton kernels and the reference): `relative=n`
    # gives a table n offsets wider than the sequence's reach, seq - 1. Random and global blocks reach
    # any offset.
    "relative": ((2, 48, 2, 8), dict(block_size=4, relative=0)),
    "relative_causal_padding": ((2, 41, 2, 8), dict(block_size=4, causal=True, padding=(41, 30), relative=3)),
    "relative_given_layout_seq_not_multiple": (
        (1, 45, 2, 8), dict(block_size=6, random_layout=_given_layout(2, 8, 3), global_blocks=(2,), relative=1)
    ),
    "relative_single_block": ((1, 5, 2, 8), dict(block_size=8, relative=0)),
    # 12-token blocks: 16-position slots, each split by two 8-position Mosaic kernel blocks.
    "relative_kernel_blocks_within_slot": ((1, 56, 2, 8), dict(block_size=12, causal=True, relative=2)),
}

# The Mosaic defaults on BigBird blocks shorter than them: 128-position kernel blocks spanning
# 2 blocks of 64 tokens or 4 of 32, each visit masked by the bits of the block pairs it attends.
# Sequences of a few such kernel blocks; the other implementations run the cases above.
TPU_DEFAULT_BLOCKS = ("pallas", {"interpret": True, "block_sizes": TpuBlockSizes()})
WIDE_TILE_CASES = {
    "two_blocks_per_tile": (
        (1, 384, 2, 8), dict(block_size=64, num_random_blocks=2, global_mask=((3, 300),), padding=(370,))
    ),
    "four_blocks_per_tile_causal": ((1, 256, 2, 8), dict(block_size=32, causal=True, global_blocks=(0, 5))),
    # The per-visit bias read per slot pair: 2 x 2 and 4 x 4 pairs a tile.
    "relative_two_blocks_per_tile": (
        (1, 384, 2, 8), dict(block_size=64, num_random_blocks=2, padding=(370,), relative=0)
    ),
    "relative_four_blocks_per_tile_causal": (
        (1, 256, 2, 8), dict(block_size=32, causal=True, global_blocks=(0, 5), relative=1)
    ),
}


def _build(case, dtype, cases=CASES):
    shape, options = cases[case]
    options = dict(options)
    batch, seq = shape[:2]
    if "global_mask" in options:
        options["global_mask"] = battery.token_mask(batch, seq, options["global_mask"])
    if "padding" in options:
        options["padding_mask"] = battery.padding_mask(batch, seq, options.pop("padding"))
    arrays = battery.random_inputs(sum(map(ord, case)), shape, dtype, 3)
    extra_offsets = options.pop("relative", None)
    if extra_offsets is None:
        return arrays, lambda impl, extra: functools.partial(block_sparse_attention, impl=impl, **options, **extra)
    arrays += battery.relative_inputs(sum(map(ord, case)) + 7, shape, dtype, max_offset=seq - 1 + extra_offsets)

    def make(impl, extra):
        def fn(q, k, v, queries, embeddings):
            relative = RelativePositions(queries, embeddings)
            return block_sparse_attention(q, k, v, impl=impl, relative=relative, **options, **extra)

        return fn

    return arrays, make


# Interpreted kernels compile slowly, so they run a cross-section that still covers every
# option: the Triton formulation most cases, the Mosaic one a few (the kernel math is shared).
SUBSETS = {
    "pallas-gpu": {
        ("itc_defaults", "f32"), ("seq_not_multiple_of_block", "f32"), ("single_block", "f32"),
        ("no_globals_wide_window", "f32"), ("given_layout", "f32"), ("causal_given_layout", "f32"),
        ("padding_with_empty_row", "f32"), ("causal_global_mask_padding", "f32"),
        ("block_size_not_power_of_two", "f32"), ("other_global_blocks", "bf16"), ("causal", "bf16"),
        ("global_mask_in_global_blocks", "f32"),
        # The position term as a per-visit bias; the global blocks through the XLA rows. The
        # given layout's 6-token blocks sit in 8-position slots, split by the 4-position kernel blocks.
        ("relative", "f32"), ("relative_causal_padding", "bf16"), ("relative_given_layout_seq_not_multiple", "f32"),
        ("relative_single_block", "f32"),
    },
    "pallas-tpu": {
        ("causal", "f32"), ("global_mask", "f32"), ("block_size_not_power_of_two", "f32"), ("short_sequence", "bf16"),
        ("global_mask_in_global_blocks", "f32"),
        # The per-visit bias cut by lane rotations; 6-token blocks in 8-position slots.
        ("relative", "f32"), ("relative_causal_padding", "bf16"), ("relative_given_layout_seq_not_multiple", "f32"),
        ("relative_kernel_blocks_within_slot", "f32"),
    },
}


@pytest.mark.parametrize("implementation, case, dtype", battery.matrix(IMPLEMENTATIONS, CASES, DTYPES, SUBSETS))
def test_matches_reference(implementation, case, dtype):
    impl, extra = implementation
    arrays, make = _build(case, dtype)
    battery.assert_matches_reference(
        make(impl, extra), make("reference", {}), arrays, dot_dtype=_dot_dtype(impl, extra, dtype)
    )


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=f"pallas-tpu-default-blocks-{case}-f32") for case in WIDE_TILE_CASES]
)
def test_kernel_blocks_spanning_bigbird_blocks_match_reference(case):
    impl, extra = TPU_DEFAULT_BLOCKS
    arrays, make = _build(case, jnp.float32, WIDE_TILE_CASES)
    battery.assert_matches_reference(make(impl, extra), make("reference", {}), arrays)


# The per-visit bias's slot pairs on Mosaic blocks of other shapes: a two-slot query block against
# keys within a slot (and the reverse backward), and 32-key compute blocks inside a two-slot key block.
RELATIVE_TPU_BLOCKS = {
    "q_two_slots_k_within_slot": TpuBlockSizes(block_q=128, block_k=32, block_q_bwd=32, block_k_bwd=128),
    "compute_blocks_within_slot": TpuBlockSizes(128, 128, 128, 128, block_k_compute=32),
}


@pytest.mark.parametrize("blocks", list(RELATIVE_TPU_BLOCKS))
def test_relative_on_mosaic_blocks_of_other_shapes_matches_reference(blocks):
    arrays, make = _build("relative_two_blocks_per_tile", jnp.float32, WIDE_TILE_CASES)
    extra = {"interpret": True, "block_sizes": RELATIVE_TPU_BLOCKS[blocks]}
    battery.assert_matches_reference(make("pallas", extra), make("reference", {}), arrays)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_under_jit_and_vmap(implementation):
    impl, extra = implementation
    batch, seq, heads, dim = 3, 30, 2, 8
    arrays = battery.random_inputs(11, (batch, seq, heads, dim), jnp.float32, 3)
    masks = (
        battery.token_mask(batch, seq, ((0,), (3, 20), ())),
        battery.padding_mask(batch, seq, (30, 22, 9)),
    )

    def single(impl_name, extra_options, q, k, v, g, p):
        out = block_sparse_attention(
            q[None], k[None], v[None], block_size=4, global_mask=g[None], padding_mask=p[None],
            max_global_tokens=2, seed=3, impl=impl_name, **extra_options,
        )
        return out[0]

    battery.assert_jit_vmap_matches_reference(
        functools.partial(single, impl, extra), functools.partial(single, "reference", {}), arrays, masks,
        dot_dtype=_dot_dtype(impl, extra, jnp.float32),
    )


@settings(max_examples=25)
@given(
    batch=st.integers(1, 2), seq=st.integers(1, 40), heads=st.integers(1, 2),
    block_size=st.integers(1, 9), radius=st.integers(0, 2), r=st.integers(0, 3),
    causal=st.booleans(), num_globals=st.integers(0, 2), seed=st.integers(0, 1000), data=st.data(),
)
def test_property_matches_reference(batch, seq, heads, block_size, radius, r, causal, num_globals, seed, data):
    blocks = -(-seq // block_size)
    global_blocks = tuple(data.draw(st.lists(st.integers(-blocks, blocks - 1), max_size=num_globals)))
    bits = st.lists(st.booleans(), min_size=seq, max_size=seq)
    global_mask = jnp.asarray([data.draw(bits) for _ in range(batch)]) if data.draw(st.booleans()) else None
    padding_mask = jnp.asarray([data.draw(bits) for _ in range(batch)]) if data.draw(st.booleans()) else None
    q, k, v = battery.random_inputs(seed, (batch, seq, heads, 4), jnp.float32, 3)
    options = dict(
        block_size=block_size, num_window_blocks=2 * radius + 1, global_blocks=global_blocks,
        num_random_blocks=r, causal=causal, seed=seed, global_mask=global_mask, padding_mask=padding_mask,
    )
    battery.assert_matches_reference(
        functools.partial(block_sparse_attention, impl="xla", **options),
        functools.partial(block_sparse_attention, impl="reference", **options),
        (q, k, v), check_grads=False,
    )


def test_no_seq_by_seq_array_in_xla_program():
    seq = 4096
    q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, seq), jnp.bool_)
    fn = lambda q, k, v, g, p: block_sparse_attention(
        q, k, v, block_size=64, global_mask=g, padding_mask=p, max_global_tokens=4, impl="xla"
    )
    grad = jax.grad(lambda q, k, v, g, p: jnp.sum(fn(q, k, v, g, p)), (0, 1, 2))
    for f in (fn, grad):
        assert f"{seq}x{seq}" not in jax.jit(f).lower(q, q, q, mask, mask).as_text()
    # Nor with relative positions, whose table spans every offset.
    table = jax.ShapeDtypeStruct((2 * seq - 1, 2, 16), jnp.float32)
    rel = lambda q, k, v, p, r, e: block_sparse_attention(
        q, k, v, block_size=64, padding_mask=p, relative=RelativePositions(r, e), impl="xla"
    )
    rel_grad = jax.grad(lambda *xs: jnp.sum(rel(*xs)), (0, 1, 2, 4, 5))
    for f in (rel, rel_grad):
        assert f"{seq}x{seq}" not in jax.jit(f).lower(q, q, q, mask, q, table).as_text()


# --- the random layout generator -------------------------------------------------------------


def _covered(a, blocks, radius, globals_):
    return {b for b in range(a - radius, a + radius + 1) if 0 <= b < blocks} | set(globals_)


@settings(max_examples=80)
@given(
    blocks=st.integers(1, 30), heads=st.integers(1, 4), r=st.integers(0, 5), radius=st.integers(0, 3),
    causal=st.booleans(), seed=st.integers(0, 2**31 - 1), data=st.data(),
)
def test_layout_guarantees(blocks, heads, r, radius, causal, seed, data):
    global_blocks = tuple(data.draw(st.lists(st.integers(-blocks, blocks - 1), max_size=3)))
    globals_ = {g % blocks for g in global_blocks}
    layout = bigbird_random_layout(
        blocks, heads, r, num_window_blocks=2 * radius + 1, global_blocks=global_blocks,
        causal=causal, seed=seed,
    )
    assert layout.shape == (heads, blocks, r) and layout.dtype == np.int32
    again = bigbird_random_layout(
        blocks, heads, r, num_window_blocks=2 * radius + 1, global_blocks=global_blocks,
        causal=causal, seed=seed,
    )
    np.testing.assert_array_equal(layout, again)
    for h in range(heads):
        for a in range(blocks):
            row = layout[h, a]
            chosen = [int(b) for b in row if b != -1]
            if a in globals_:
                assert not chosen
                continue
            assert len(set(chosen)) == len(chosen), "a block repeats within a row"
            assert all(0 <= b < blocks for b in chosen)
            assert not set(chosen) & _covered(a, blocks, radius, globals_), "random block already covered"
            if causal:
                assert all(b < a for b in chosen), "causal row drew a later block"
            candidates = [
                b for b in range(blocks)
                if b not in _covered(a, blocks, radius, globals_) and (not causal or b < a)
            ]
            assert len(chosen) == min(r, len(candidates))
            assert all(b == -1 for b in row[len(chosen):]), "-1 fills only the tail"


def test_layout_differs_across_heads_and_seeds():
    layout = bigbird_random_layout(64, 4, 3, seed=0)
    for h in range(1, 4):
        assert not np.array_equal(layout[0], layout[h])
    assert not np.array_equal(layout, bigbird_random_layout(64, 4, 3, seed=1))


def test_layout_draws_every_candidate_eventually():
    # Over many seeds, every candidate block of a row is drawn: the draw is not biased to a subset.
    seen = set()
    for seed in range(200):
        seen |= set(bigbird_random_layout(12, 1, 2, seed=seed)[0, 5].tolist())
    assert seen == set(range(12)) - {0, 4, 5, 6, 11}


# --- bad input ---------------------------------------------------------------------------------

SHAPE = (1, 16, 2, 4)
BAD = {
    "block_size_zero": (dict(block_size=0), "block_size must be an int >= 1"),
    "window_even": (dict(num_window_blocks=2), "num_window_blocks must be a positive odd"),
    "window_zero": (dict(num_window_blocks=0), "num_window_blocks must be a positive odd"),
    "global_out_of_range": (dict(global_blocks=(0, 4)), "global_blocks entry 4 is out of range"),
    "global_negative_out_of_range": (dict(global_blocks=(-5,)), "global_blocks entry -5 is out of range"),
    "random_negative": (dict(num_random_blocks=-1), "num_random_blocks must be"),
    "layout_wrong_shape": (dict(random_layout=np.zeros((2, 3, 3), np.int32)), "random_layout must have shape"),
    "layout_out_of_range": (dict(random_layout=np.full((2, 4, 3), 4, np.int32)), "random_layout entries"),
    "layout_below_minus_one": (dict(random_layout=np.full((2, 4, 3), -2, np.int32)), "random_layout entries"),
    "layout_float": (dict(random_layout=np.zeros((2, 4, 3), np.float32)), "random_layout must hold integers"),
    "global_mask_wrong_shape": (dict(global_mask=jnp.zeros((1, 15), bool)), "global_mask must have shape"),
    "padding_mask_not_bool": (dict(padding_mask=jnp.ones((1, 16))), "padding_mask must be a boolean"),
    "mismatched_shapes": (dict(k=jnp.ones((1, 16, 2, 5))), "same shape"),
    "scale_negative": (dict(scale=-1.0), "scale must be"),
    "unknown_impl": (dict(impl="triton"), "impl must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    overrides, message = BAD[case]
    overrides = dict(overrides)
    q = jnp.ones(SHAPE)
    k = overrides.pop("k", q)
    options = dict(block_size=4)
    options.update(overrides)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, q, **options)


def test_pallas_kernel_block_must_divide_the_slot():
    # 24-token BigBird blocks sit in 24-position slots on TPU; a 16-query block would straddle two.
    with pytest.raises(NotImplementedError, match="block_sizes.block_q=16 does not divide"):
        block_sparse_attention(
            *(jnp.ones((1, 48, 1, 8)),) * 3, block_size=24, impl="pallas", interpret=True,
            block_sizes=TpuBlockSizes(block_q=16),
        )


def test_kernel_options_are_refused_by_other_implementations():
    for impl in ("xla", "reference"):
        with pytest.raises(NotImplementedError, match="block_sizes: options of impl='pallas' only"):
            block_sparse_attention(*(jnp.ones(SHAPE),) * 3, block_size=4, impl=impl, block_sizes=GpuBlockSizes())


def test_layout_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        bigbird_random_layout(0, 1, 1)
    with pytest.raises(ValueError, match="num_window_blocks"):
        bigbird_random_layout(8, 1, 1, num_window_blocks=4)
    with pytest.raises(ValueError, match="global_blocks"):
        bigbird_random_layout(8, 1, 1, global_blocks=(9,))


# --- Transformer-XL relative positions -------------------------------------------------------


def _relative(shape, max_offset):
    return RelativePositions(*battery.relative_inputs(3, shape, jnp.float32, max_offset=max_offset))


def test_relative_table_must_reach_every_offset_of_the_sequence():
    q = jnp.ones((1, 20, 2, 8))
    # A query's random or global blocks may be anywhere: the table covers seq - 1 = 19 offsets.
    with pytest.raises(ValueError, match=r"relative.embeddings covers offsets up to 18.*up to 19"):
        block_sparse_attention(q, q, q, block_size=4, relative=_relative(q.shape, 18), impl="xla")
    with pytest.raises(ValueError, match=r"relative.queries must have q's shape"):
        block_sparse_attention(q, q, q, block_size=4, relative=RelativePositions(q[:, :8], _relative(q.shape, 19)[1]))


def test_relative_is_refused_where_it_is_not_computed():
    q = jnp.ones((1, 16, 2, 8))
    relative = _relative(q.shape, 15)
    global_mask = battery.token_mask(1, 16, ((3,),))
    for impl in ("xla", "pallas", "reference"):
        with pytest.raises(NotImplementedError, match="relative with global_mask"):
            block_sparse_attention(q, q, q, block_size=4, global_mask=global_mask, relative=relative, impl=impl)
    with jax.set_mesh(jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))):
        with pytest.raises(NotImplementedError, match="relative positions .relative=. only unsharded"):
            block_sparse_attention(q, q, q, block_size=4, relative=relative, impl="xla", sequence_axis="sequence")


def test_relative_changes_the_output():
    """The position term reaches the result (a battery that dropped it would still need this to fail)."""
    q, k, v = battery.random_inputs(5, (1, 24, 2, 8), jnp.float32, 3)
    relative = _relative(q.shape, 23)
    plain = block_sparse_attention(q, k, v, block_size=4, impl="xla")
    with_positions = block_sparse_attention(q, k, v, block_size=4, relative=relative, impl="xla")
    assert float(jnp.abs(with_positions - plain).max()) > 0.1


def test_relative_on_the_kernels_keeps_the_queries_not_the_bias():
    # The Triton kernels' per-visit bias (6 entries of 4-position slots, 24 float32 columns a query)
    # is recomputed in the backward pass: the gradient keeps the position queries and the table.
    q, k, v = battery.random_inputs(6, (1, 40, 2, 8), jnp.float32, 3)
    relative = _relative(q.shape, 39)
    op = lambda q, k, v, queries, table: block_sparse_attention(
        q, k, v, block_size=4, relative=RelativePositions(queries, table), impl="pallas", interpret=True,
        block_sizes=GpuBlockSizes(8, 4, 4, 8),
    )
    _, backward = jax.vjp(op, q, k, v, *relative)
    saved = jax.tree_util.tree_leaves(backward)
    assert not [x.shape for x in saved if x.ndim == 4 and x.shape[-1] == 24]
    assert any(x.shape == relative.embeddings.shape for x in saved)
