"""The Mosaic lowering's own mechanics: key blocks computed in sub-blocks, interpreted and lowered.

A grid step DMAs a key block and computes it `block_k_compute` keys at a time,
skipping the sub-blocks the band misses and masking only those it cuts or
that hold an invalid key (`block_sparse_tpu.key_compute_block`). The op
batteries run the kernels through `block_sparse_flash` with the default
compute blocks (the whole block at their tiny sizes); here the lowering is
called directly with small compute blocks, so every sub-block case occurs.
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
from longjax.attention import masks, partial_softmax, sliding_window_attention
from longjax.attention.kernel_layouts import BandPattern
from tests.attention import battery


@dataclasses.dataclass(frozen=True)
class _Call:
    """What the lowering reads of `block_sparse_flash._Config`, built here from the layouts alone."""

    forward_layout: object
    backward_layout: object
    scale: float
    backend: str = "tpu"
    interpret: bool = True


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

    out, lse = block_sparse_tpu.forward(q, k, v, valid, config, block_k_compute=8)
    ref_out, ref_lse = _dense(q, k, v, allowed, scale)
    tol = battery.tolerance(jnp.float32, jnp.float32)
    chex.assert_trees_all_close(out, ref_out, **tol)
    chex.assert_trees_all_close(lse, ref_lse, **tol)

    # The backward as `block_sparse_flash`'s custom VJP calls it, against the dense VJP.
    out_ct = battery.random_inputs(12, q.shape, jnp.float32, 1)[0]
    lse_ct = jnp.asarray(np.random.default_rng(13).normal(size=lse.shape), jnp.float32)
    row_term, lse_b = common.backward_row_terms(jnp.swapaxes(out, 1, 2), lse, jnp.swapaxes(out_ct, 1, 2), lse_ct)
    lse2 = jnp.where(lse_b < -common.MASK_VALUE / 2, lse_b * block_sparse_flash.LOG2E, -common.MASK_VALUE)
    grads = block_sparse_tpu.backward(q, k, v, valid, out_ct, lse2, row_term, config, block_k_compute=8)
    _, vjp = jax.vjp(lambda q, k, v: _dense(q, k, v, allowed, scale), q, k, v)
    for name, g, rg in zip("qkv", grads, vjp((out_ct, lse_ct))):
        chex.assert_trees_all_close(g, rg, **tol, custom_message=f"d{name}")


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
