"""The block-sparse flash kernels on their own, interpreted on CPU, against dense softmax.

The ops' batteries (tests/attention) cover the patterns and options end to end;
here the kernels' own contract: both outputs (out and the log-sum-exp), the
gradients through both (the lse cotangent included), rows with no valid key,
per-head layouts, both formulations, and the validation of their options.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import block_sparse_flash as block_sparse_kernels
from kernels_pallas import block_sparse_gpu, common
from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes, dot_operand_dtype
from longjax.attention import bigbird_random_layout, masks, partial_softmax, sliding_window_attention, specs
from longjax.attention.kernel_layouts import BandPattern, BigBirdPattern
from tests.attention import battery

FORMULATIONS = {
    # Query and key blocks of different lengths in forward and backward.
    "gpu": GpuBlockSizes(block_q=8, block_k=4, block_q_bwd=4, block_k_bwd=8),
    "tpu": TpuBlockSizes(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=8),
}


def _band_problem(batch, seq, heads):
    pattern = BandPattern(seq_len=seq, left=6, right=3)
    allowed = masks.dilated_window_mask(seq, left=6, right=3)[None, None]
    return pattern, allowed


def _bigbird_problem(batch, seq, heads):
    blocks = seq // 8
    layout = bigbird_random_layout(blocks, heads, 2, global_blocks=(1,), causal=True, seed=4)
    spec = specs.BlockSparseSpec(
        block_size=8, num_blocks=blocks, window_radius=1, global_blocks=(1,), random_layout=layout, causal=True
    )
    pattern = BigBirdPattern(spec, seq_len=seq, slot=8)
    allowed = masks.block_sparse_mask(
        seq, block_size=8, window_radius=1, global_blocks=(1,), random_layout=layout, causal=True
    )
    # The kernel's BigBird pattern is the sparse part only: the global blocks' rows and columns are
    # dense passes above the kernel (`pallas_block_sparse`).
    in_global = np.arange(seq) // 8 == 1
    return pattern, allowed & ~in_global[:, None] & ~in_global[None, :]


def _dense(q, k, v, allowed, scale):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    probs, lse = partial_softmax.masked_softmax(scores, allowed)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype), lse


def _loss(fn, out_ct, lse_ct):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        # Rows that attend nothing have lse = MASK_VALUE: a constant, kept out of the loss.
        lse = jnp.where(lse > common.MASK_VALUE / 2, lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * out_ct) + jnp.sum(lse * lse_ct)

    return loss


@pytest.mark.parametrize(
    "formulation, problem, dtype",
    [
        ("gpu", "band", jnp.float32), ("tpu", "band", jnp.float32), ("gpu", "bigbird", jnp.float32),
        ("tpu", "bigbird", jnp.float32), ("gpu", "band", jnp.bfloat16),
    ],
)
def test_out_lse_and_gradients_match_dense(formulation, problem, dtype):
    _assert_matches_dense(formulation, problem, dtype, dim=8)


@pytest.mark.parametrize("problem, dim, dtype", [("band", 24, jnp.float32), ("bigbird", 40, jnp.bfloat16)])
def test_triton_kernels_mask_heads_that_are_not_a_power_of_two(problem, dim, dtype):
    # q, k, v stay `dim` wide in HBM; the kernels' tiles are 32 and 64 wide, loaded with a mask (the
    # interpreter fills what lies past the array with NaN, so a missing mask shows) and stored with one.
    _assert_matches_dense("gpu", problem, dtype, dim)


def _assert_matches_dense(formulation, problem, dtype, dim):
    batch, seq, heads = 3, 40, 2
    pattern, allowed = {"band": _band_problem, "bigbird": _bigbird_problem}[problem](batch, seq, heads)
    q, k, v = battery.random_inputs(1, (batch, seq, heads, dim), dtype, 3)
    # Row 0 all valid, row 1 with holes (some blocks need the validity mask), row 2 no valid key.
    key_valid = jnp.asarray(np.stack([np.ones(seq, bool), np.arange(seq) % 5 != 2, np.zeros(seq, bool)]))
    allowed = allowed & key_valid[:, None, None, :]
    scale = 0.4
    fast = functools.partial(
        block_sparse_kernels.block_sparse_flash, key_valid=key_valid, pattern=pattern, scale=scale,
        block_sizes=FORMULATIONS[formulation], interpret=True,
    )
    ref = functools.partial(_dense, allowed=allowed, scale=scale)
    (out, lse), (ref_out, ref_lse) = jax.jit(fast)(q, k, v), ref(q, k, v)
    # Float32 through the Triton kernels: bfloat16 matmul operands, BF16_DOTS_TOLERANCE.
    tol = battery.tolerance(dtype, dot_operand_dtype(FORMULATIONS[formulation], dtype))
    assert out.dtype == dtype and lse.dtype == jnp.float32
    chex.assert_trees_all_close(out.astype(jnp.float32), ref_out.astype(jnp.float32), **tol)
    chex.assert_trees_all_close(lse, ref_lse, **tol)
    assert np.all(np.asarray(out[2]) == 0) and np.all(np.asarray(lse[2]) == common.MASK_VALUE)

    out_ct, lse_ct = battery.random_inputs(2, q.shape, jnp.float32, 1)[0], jnp.asarray(
        np.random.default_rng(3).normal(size=lse.shape), jnp.float32
    )
    grads = jax.jit(jax.grad(_loss(fast, out_ct, lse_ct), (0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(_loss(ref, out_ct, lse_ct), (0, 1, 2))(q, k, v)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32))), name
        chex.assert_trees_all_close(
            g.astype(jnp.float32), rg.astype(jnp.float32), **tol, custom_message=f"d{name}"
        )


def test_lse_cotangent_alone_reaches_the_inputs():
    # d lse / d s = p: with a zero output cotangent the gradient comes from the lse alone.
    pattern, allowed = _band_problem(1, 24, 1)
    q, k, v = battery.random_inputs(5, (1, 24, 1, 8), jnp.float32, 3)
    key_valid = jnp.ones((1, 24), bool)
    fast = functools.partial(
        block_sparse_kernels.block_sparse_flash, key_valid=key_valid, pattern=pattern, scale=0.5,
        block_sizes=FORMULATIONS["gpu"], interpret=True,
    )
    zero = jnp.zeros(q.shape, jnp.float32)
    lse_ct = jnp.ones((1, 1, 24), jnp.float32)
    grads = jax.jit(jax.grad(_loss(fast, zero, lse_ct), (0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(_loss(functools.partial(_dense, allowed=allowed, scale=0.5), zero, lse_ct), (0, 1, 2))(q, k, v)
    assert np.abs(np.asarray(grads[0])).max() > 0.1 and np.all(np.asarray(grads[2]) == 0)
    chex.assert_trees_all_close(grads, ref_grads, **battery.tolerance(jnp.float32, jnp.bfloat16))


def test_matmul_modes_per_lowering():
    assert dot_operand_dtype(GpuBlockSizes(), jnp.float32) == jnp.bfloat16
    assert dot_operand_dtype(TpuBlockSizes(), jnp.float32) == jnp.float32
    for blocks in (GpuBlockSizes(), TpuBlockSizes()):
        assert dot_operand_dtype(blocks, jnp.bfloat16) == jnp.bfloat16
        assert dot_operand_dtype(blocks, jnp.float16) == jnp.float16


@pytest.mark.parametrize("formulation", ["gpu", "tpu"])
def test_float32_matmul_operands_are_what_the_lowering_says(formulation):
    # The Triton kernels cast float32 operands to bfloat16 inside the kernel: inputs already
    # rounded to bfloat16 give bit-identical outputs and gradients, so the interpreted run
    # computes the GPU's mode, not float32 products. The Mosaic kernels keep float32 operands.
    pattern, _ = _band_problem(1, 24, 1)
    q, k, v = battery.random_inputs(6, (1, 24, 1, 8), jnp.float32, 3)
    fast = functools.partial(
        block_sparse_kernels.block_sparse_flash, key_valid=jnp.ones((1, 24), bool), pattern=pattern, scale=0.5,
        block_sizes=FORMULATIONS[formulation], interpret=True,
    )
    loss = jax.jit(jax.value_and_grad(_loss(fast, battery.random_inputs(7, q.shape, jnp.float32, 1)[0],
                                            jnp.ones((1, 1, 24), jnp.float32)), (0, 1, 2)))
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)]
    (value, grads), (value_r, grads_r) = loss(q, k, v), loss(*rounded)
    results, results_r = [np.asarray(x) for x in (value, *grads)], [np.asarray(x) for x in (value_r, *grads_r)]
    if formulation == "gpu":
        for a, b in zip(results, results_r):
            np.testing.assert_array_equal(a, b)
    else:
        assert all(np.abs(a - b).max() > 1e-4 for a, b in zip(results, results_r))


BAD_BLOCK_SIZES = [
    (lambda: GpuBlockSizes(block_q=48), "GpuBlockSizes.block_q must be None or a power of two, got 48"),
    (lambda: GpuBlockSizes(block_k_bwd=0), "GpuBlockSizes.block_k_bwd must be None or a power of two"),
    (lambda: GpuBlockSizes(num_warps=3), "GpuBlockSizes.num_warps must be None or a power of two"),
    (lambda: GpuBlockSizes(num_stages=0), "GpuBlockSizes.num_stages must be an int >= 1"),
    (lambda: TpuBlockSizes(block_k=100), "TpuBlockSizes.block_k must be a positive multiple of 8, got 100"),
    (lambda: TpuBlockSizes(block_q_bwd=True), "TpuBlockSizes.block_q_bwd must be a positive multiple of 8"),
]


@pytest.mark.parametrize("make, message", BAD_BLOCK_SIZES)
def test_block_sizes_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_compiled_triton_refuses_blocks_below_16():
    q = jax.ShapeDtypeStruct((1, 64, 1, 16), jnp.bfloat16)
    fn = lambda q, k, v: sliding_window_attention(
        q, k, v, window=4, impl="pallas", interpret=False, block_sizes=GpuBlockSizes(block_q=8)
    )
    with pytest.raises(ValueError, match="compiled Triton needs blocks >= 16"):
        jax.eval_shape(fn, q, q, q)


def test_kernel_checks_its_inputs():
    pattern = BandPattern(seq_len=16, left=1, right=1)
    q = jnp.zeros((1, 16, 1, 8))
    with pytest.raises(ValueError, match="the pattern expects 16"):
        block_sparse_kernels.block_sparse_flash(
            q[:, :8], q[:, :8], q[:, :8], jnp.ones((1, 8), bool), pattern=pattern, scale=1.0
        )
    with pytest.raises(ValueError, match="key_valid must be bool"):
        block_sparse_kernels.block_sparse_flash(q, q, q, jnp.ones((1, 16)), pattern=pattern, scale=1.0)


def test_defaults_on_cpu_are_interpreted_gpu_kernels(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert common.resolve_interpret(None) is True and common.resolve_interpret(False) is False
    default = block_sparse_kernels.default_block_sizes
    assert default(None, interpret=True) == GpuBlockSizes()
    # Compiled from a CPU host (an export): the lowered platform chooses (`per_lowering`).
    assert default(None, interpret=False) is None
    assert default(TpuBlockSizes(block_q=64), interpret=False) == TpuBlockSizes(block_q=64)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert default(None, interpret=True) == TpuBlockSizes() and default(None, interpret=False) == TpuBlockSizes()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert default(None, interpret=True) == GpuBlockSizes() and default(None, interpret=False) == GpuBlockSizes()


def test_each_lowering_checks_its_own_options_when_both_are_traced():
    # A 576-wide head is beyond the Triton tiles: with block_sizes=None an export from a CPU
    # host traces the Triton lowering too, which refuses, naming itself.
    q = jax.ShapeDtypeStruct((1, 256, 1, 576), jnp.bfloat16)
    fn = lambda q: sliding_window_attention(q, q, q, window=16, impl="pallas", interpret=False)
    with pytest.raises(NotImplementedError, match=r"head_dim up to 256, got 576.*the GpuBlockSizes one"):
        jax.eval_shape(fn, q)
    # Naming the Mosaic lowering traces it alone.
    jax.eval_shape(
        lambda q: sliding_window_attention(
            q, q, q, window=16, impl="pallas", interpret=False, block_sizes=TpuBlockSizes()
        ),
        q,
    )


def test_impl_none_falls_back_to_xla_where_pallas_cannot_serve(monkeypatch):
    # On an accelerator impl=None tries 'pallas' first; a combination it does not serve
    # (block_size, impl='xla''s tiling) raises NotImplementedError naming it, and XLA serves.
    q, k, v = battery.random_inputs(8, (1, 20, 2, 8), jnp.float32, 3)
    with pytest.raises(NotImplementedError, match="block_size"):
        sliding_window_attention(q, k, v, window=3, block_size=4, impl="pallas")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    out = sliding_window_attention(q, k, v, window=3, block_size=4)
    monkeypatch.undo()
    np.testing.assert_allclose(
        out, sliding_window_attention(q, k, v, window=3, impl="reference"), **battery.TOLERANCES[jnp.dtype(jnp.float32)]
    )


def test_triton_refuses_heads_wider_than_its_tiles():
    # 64 content features + 512 Transformer-XL position features, as the char LM's heads.
    q = jnp.zeros((1, 256, 1, 576), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="head_dim up to 256, got 576"):
        jax.eval_shape(
            lambda q: sliding_window_attention(
                q, q, q, window=16, impl="pallas", interpret=False, block_sizes=GpuBlockSizes()
            ),
            q,
        )


def test_triton_kernels_refuse_layouts_with_sub_block_masks():
    # A TPU BigBird layout (128-position kernel blocks over 64-position slots) leaves out slot pairs
    # inside its visits, which only the Mosaic kernels mask: the Triton ones must refuse it, not attend whole tiles.
    spec = specs.BlockSparseSpec(
        block_size=64, num_blocks=8, window_radius=1, global_blocks=(0,), causal=False,
        random_layout=bigbird_random_layout(8, 1, 1, global_blocks=(0,), seed=0),
    )
    pattern = BigBirdPattern(spec, seq_len=512, slot=64)
    layout = pattern.layout(128, 128, pattern.padded_len((128, 128)))
    assert layout.sub_block == 64
    config = dataclasses.replace(
        block_sparse_kernels._make_config(BandPattern(seq_len=512, left=8, right=8), GpuBlockSizes(), True, 1.0, 16,
                                          jnp.float32),
        pattern=pattern, block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128,
    )
    x = jnp.zeros((1, 512, 1, 16), jnp.float32)
    with pytest.raises(NotImplementedError, match="no sub-block masks"):
        block_sparse_gpu.forward(x, x, x, jnp.ones((1, 512), bool), config)
