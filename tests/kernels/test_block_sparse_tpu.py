"""The Mosaic lowering's own mechanics: key blocks computed in sub-blocks, interpreted and lowered.

A grid step DMAs a key block and computes it `block_k_compute` keys at a time,
skipping the sub-blocks the band misses and masking only those it cuts or
that hold an invalid key (`block_sparse_tpu.key_compute_block`). The op
batteries run the kernels through `block_sparse_flash` with the default
compute blocks (the whole block at their tiny sizes); here the lowering is
called directly with small compute blocks, so every sub-block case occurs.
So are BigBird layouts whose kernel blocks span several slots, masked by
their visits' slot-pair bits.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kernels_pallas import block_sparse_flash, block_sparse_tpu, common
from kernels_pallas.block_sparse_flash import TpuBlockSizes
from longjax.attention import bigbird_random_layout, masks, partial_softmax, specs
from longjax.attention import sliding_window_attention
from longjax.attention.kernel_layouts import BandPattern, BigBirdPattern
from tests.attention import battery
from tests.kernels.layout_checks import visited


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the lowering reads of `block_sparse_flash._Config`, built here from the layouts alone."""

    forward_layout: object
    backward_layout: object
    scale: float
    backend: str = "tpu"
    interpret: bool = True
    block_k_compute: int | None = None


def _dense(q, k, v, allowed, scale):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs, lse = partial_softmax.masked_softmax(scores, allowed)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), lse


def test_key_compute_block():
    assert block_sparse_tpu.key_compute_block(512) == 128
    assert block_sparse_tpu.key_compute_block(128) == 128
    assert block_sparse_tpu.key_compute_block(64) == 64
    assert block_sparse_tpu.key_compute_block(32, 8) == 8
    for bad in (12, 24, 0):
        with pytest.raises(ValueError, match="block_k_compute must be a positive multiple of 8 dividing 32"):
            block_sparse_tpu.key_compute_block(32, bad)


def _sub_block_kinds(layout, block_kc):
    """The kinds of the key sub-blocks of a layout's partial visits: the band misses, cuts or covers them."""
    kinds = set()
    for row, col, partial in zip(*layout.entries()):
        for c in range(layout.block_k // block_kc) if partial else ():
            k_lo, q_lo = col * layout.block_k + c * block_kc, row * layout.block_q
            least, most = k_lo - (q_lo + layout.block_q - 1), k_lo + block_kc - 1 - q_lo
            if most < -layout.left or least > layout.right:
                kinds.add("missed")
            else:
                kinds.add("covered" if least >= -layout.left and most <= layout.right else "cut")
    return kinds


@pytest.mark.parametrize("left, right, kinds", [(6, 3, {"missed", "cut"}), (20, 0, {"missed", "cut", "covered"})])
def test_sub_blocks_match_dense(left, right, kinds):
    # 32-key blocks in 8-key sub-blocks: partial visits have sub-blocks the band misses
    # (skipped), cuts (masked) and covers (unmasked); batch 1 has invalid keys.
    batch, seq, heads, dim, scale = 2, 40, 2, 8, 0.4
    pattern, padded = BandPattern(seq_len=seq, left=left, right=right), 64
    config = _Call(pattern.layout(8, 32, padded), pattern.layout(16, 32, padded), scale)
    assert _sub_block_kinds(config.forward_layout, 8) == kinds
    q, k, v = battery.random_inputs(11, (batch, padded, heads, dim), jnp.float32, 3)
    valid = np.arange(padded) < seq
    valid = jnp.asarray(np.stack([valid, valid & (np.arange(padded) % 7 != 3)]))
    # Query blocks past the sequence are not visited: their rows attend nothing.
    real = jnp.asarray(np.arange(padded) < seq)
    allowed = masks.dilated_window_mask(padded, left=left, right=right)[None, None] & valid[:, None, None, :]
    allowed = allowed & real[None, None, :, None]

    _check_against_dense(config, q, k, v, valid, allowed, block_k_compute=8)


def _check_against_dense(config, q, k, v, valid, allowed, block_k_compute):
    """The lowering's forward and backward (as the custom VJP calls it) against dense attention over `allowed`."""
    scale = config.scale
    config = dataclasses.replace(config, block_k_compute=block_k_compute)
    out, lse = block_sparse_tpu.forward(q, k, v, valid, config)
    ref_out, ref_lse = _dense(q, k, v, allowed, scale)
    tol = battery.tolerance(jnp.float32, jnp.float32)
    chex.assert_trees_all_close(out, ref_out, **tol)
    chex.assert_trees_all_close(lse, ref_lse, **tol)

    out_ct = battery.random_inputs(12, q.shape, jnp.float32, 1)[0]
    lse_ct = jnp.asarray(np.random.default_rng(13).normal(size=lse.shape), jnp.float32)
    row_term, lse_b = common.backward_row_terms(jnp.swapaxes(out, 1, 2), lse, jnp.swapaxes(out_ct, 1, 2), lse_ct)
    lse2 = jnp.where(lse_b < -common.MASK_VALUE / 2, lse_b * block_sparse_flash.LOG2E, -common.MASK_VALUE)
    grads = block_sparse_tpu.backward(q, k, v, valid, out_ct, lse2, row_term, config)
    _, vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, allowed, scale), q, k, v)
    for name, g, rg in zip("qkv", grads, vjp((out_ct, lse_ct))):
        chex.assert_trees_all_close(g, rg, **tol, custom_message=f"d{name}")


@pytest.mark.parametrize("causal, forward_blocks, backward_blocks, block_k_compute", [
    (False, (16, 16), (32, 16), 8), (True, (16, 32), (16, 16), 16),
])
def test_slot_masks_match_dense(causal, forward_blocks, backward_blocks, block_k_compute):
    # 8-token BigBird blocks in 8-position slots, kernel blocks of 2 or 4 slots (4- and 8-bit
    # masks), keys computed a slot or two slots at a time: visits attend all (full, unmasked) or
    # some of their slot pairs; batch 1 has an invalid key; the last kernel blocks are padding.
    batch, heads, dim, scale, slot, blocks = 2, 2, 8, 0.4, 8, 9
    spec = specs.BlockSparseSpec(
        block_size=slot, num_blocks=blocks, window_radius=2, global_blocks=(0,), causal=causal,
        random_layout=bigbird_random_layout(blocks, heads, 1, num_window_blocks=5, global_blocks=(0,),
                                            causal=causal, seed=1),
    )
    pattern = BigBirdPattern(spec, seq_len=blocks * slot, slot=slot)
    padded = pattern.padded_len(forward_blocks + backward_blocks)
    config = _Call(pattern.layout(*forward_blocks, padded), pattern.layout(*backward_blocks, padded), scale)
    partial = np.concatenate([config.forward_layout.entries(h)[2] for h in range(heads)])
    assert partial.any() and (causal or not partial.all())
    q, k, v = battery.random_inputs(21, (batch, padded, heads, dim), jnp.float32, 3)
    real = np.arange(padded) < blocks * slot
    valid = jnp.asarray(np.stack([real, real & (np.arange(padded) != 27)]))
    # The pairs the layout attends, as tests/attention/test_kernel_layouts.py checks them against the mask.
    pairs = np.stack([visited(config.forward_layout, h) for h in range(heads)])
    np.testing.assert_array_equal(pairs, np.stack([visited(config.backward_layout, h) for h in range(heads)]))
    allowed = jnp.asarray(pairs)[None] & valid[:, None, None, :]
    _check_against_dense(config, q, k, v, valid, allowed, block_k_compute=block_k_compute)


def test_512_key_blocks_lower_for_tpu():
    # 512-key blocks computed 128 keys at a time go through Mosaic's lowering (block shapes,
    # the sub-block slices of k, v, the key rows and the dk/dv accumulators).
    x = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.bfloat16)
    blocks = TpuBlockSizes(block_q=128, block_k=512, block_q_bwd=128, block_k_bwd=512)
    fn = lambda q, k, v: sliding_window_attention(q, k, v, window=256, impl="pallas", interpret=False,
                                                  block_sizes=blocks)
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
    text = export.export(jax.jit(grad), platforms=["tpu"])(x, x, x).mlir_module()
    assert text.count("@tpu_custom_call(") == 3


def test_requested_compute_blocks_reach_each_kernel():
    # block_k_compute travels from TpuBlockSizes to the forward and backward kernels (their key-validity
    # flags are per compute block, so the SMEM tables show it); fitted key blocks shorten it with them,
    # and call_block_sizes reports what runs.
    blocks = TpuBlockSizes(block_q=128, block_k=512, block_q_bwd=128, block_k_bwd=256, block_k_compute=64)
    long_band = BandPattern(seq_len=2048, left=256, right=256)
    config = block_sparse_flash._make_config(long_band, blocks, False, 1.0, 64, jnp.bfloat16)
    assert config.block_k_compute == 64
    fps = block_sparse_flash.tpu_footprints(long_band, batch=1, head_dim=64, dtype=jnp.bfloat16, block_sizes=blocks)
    default = block_sparse_flash.tpu_footprints(
        long_band, batch=1, head_dim=64, dtype=jnp.bfloat16, block_sizes=dataclasses.replace(blocks, block_k_compute=None)
    )
    # One int8 flag per (batch, key compute block): 2048 / 64 against 2048 / 128.
    for kind in ("forward", "dq", "dkv"):
        assert fps[kind].smem_bytes - default[kind].smem_bytes == 2048 // 64 - 2048 // 128, kind
    # Key blocks fitted to a 200-token sequence: a 256-key compute block becomes the whole block.
    short_band = BandPattern(seq_len=200, left=16, right=16)
    asked = dataclasses.replace(blocks, block_k_bwd=512, block_k_compute=256)
    runs = block_sparse_flash.call_block_sizes(short_band, asked, head_dim=64, dtype=jnp.bfloat16)
    assert (runs.block_k, runs.block_k_bwd, runs.block_k_compute) == (200, 200, 200)
    assert block_sparse_flash._make_config(short_band, runs, False, 1.0, 64, jnp.bfloat16).block_k_compute == 200
    # 64 divides neither 200-key block: refused, naming the field.
    with pytest.raises(ValueError, match="block_k_compute=64 does not fit the key blocks"):
        block_sparse_flash.call_block_sizes(short_band, blocks, head_dim=64, dtype=jnp.bfloat16)
