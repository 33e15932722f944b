"""The math of one visit of the block-sparse flash kernels, shared by every lowering.

A visit is one (query block, key block) pair: base-2 scores, the band and key
validity applied in-kernel, one step of the online softmax, and the backward's
probabilities and score gradients. Each lowering (`block_sparse_gpu`,
`block_sparse_tpu`) calls these inside its kernel bodies, so the lowerings
differ only in how they walk the layout and move blocks, not in the math.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from kernels_pallas.common import MASK_VALUE

LOG2E = math.log2(math.e)


def bias_width(bias) -> int | None:
    """A score bias's columns, None without one (`block_sparse_flash._check_bias` checked them against the pattern)."""
    return None if bias is None else bias.shape[-1]


def key_block_flags(valid, block_k: int):
    """int32 `[batch, key_blocks]`: 1 where a key block holds an invalid key (it needs the mask)."""
    b, n = valid.shape
    return jnp.any(~valid.reshape(b, n // block_k, block_k), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Dots:
    """How a lowering runs its matmuls: operands cast to `dtype`, float32 accumulation at `precision`."""

    dtype: jnp.dtype
    precision: lax.Precision | None

    def operand(self, x):
        return x.astype(self.dtype)

    def __call__(self, a, b, dims):
        return lax.dot_general(
            self.operand(a), self.operand(b), dims, preferred_element_type=jnp.float32, precision=self.precision
        )


def dots_for(backend: str, dtype) -> Dots:
    """The matmul mode of a lowering for inputs of `dtype`.

    GPU, float32 inputs: bfloat16 operands, float32 accumulation, as
    FlashAttention does. The cast is explicit in the kernel, so interpret mode
    on CPU rounds exactly as the GPU does (bf16 products are exact in float32)
    and the tests check the real mode; a float32 `tl.dot` would otherwise be
    TF32 or, at HIGHEST, IEEE FMA dots that spill (~25 KB) and leave the
    tensor cores idle.
    TPU, float32 inputs: float32 operands at HIGHEST precision (the MXU's
    multi-pass bf16), whose VMEM tiles do not spill.
    bfloat16 or float16 inputs: the inputs' dtype, default precision, on both.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        if backend == "gpu":
            return Dots(jnp.dtype(jnp.bfloat16), None)
        return Dots(dtype, lax.Precision.HIGHEST)
    return Dots(dtype, None)


NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


def scores(q, k, qk_scale, dots, bias=None):
    """Base-2 logits float32 `[block_q, block_k]`; `bias` (float32, of their shape) is added before scaling."""
    s = dots(q, k, NT)
    if bias is not None:
        s = s + bias
    return s * qk_scale


def band_columns(shape, q_first, k_first, left: int, width: int, keys_axis: int = 1):
    """Where a score tile's pairs sit in a banded bias `[seq, width]`: (rows, columns, inside).

    The bias of query i and key j is column `c = left - i + j` of row i, so the
    `width = left + right + 1` columns are the offsets `left, left - 1, ..., -right`
    (`j - i` from `-left` to `right`). `shape` is the tile's (`keys_axis` as in
    `masked`); rows and columns are int32 of it, `inside` says `0 <= c < width`
    (the band: pairs outside it are masked anyway).
    """
    rows = q_first + lax.broadcasted_iota(jnp.int32, shape, 1 - keys_axis)
    columns = left - rows + (k_first + lax.broadcasted_iota(jnp.int32, shape, keys_axis))
    inside = (columns >= 0) & (columns < width)
    return rows, columns, inside


def visit_columns(shape, q_first, column_first, keys_axis: int = 1):
    """Where a score tile's pairs sit in a per-visit bias `[seq, width]`: (rows, columns).

    A per-visit bias (BigBird's relative positions) gives each visit its own
    columns: the tile's keys are the consecutive columns from `column_first`
    (an int32 scalar the layout's column table holds), for every query row.
    `shape` is the tile's (`keys_axis` as in `masked`).
    """
    rows = q_first + lax.broadcasted_iota(jnp.int32, shape, 1 - keys_axis)
    columns = column_first + lax.broadcasted_iota(jnp.int32, shape, keys_axis)
    return rows, columns


def masked(s, q_first, k_first, valid, left, right, keys_axis: int = 1, pairs=None):
    """Applies key validity, the band and (when given) a bool `pairs` of s's shape to the logits.

    `s` is `[block_q, block_k]` with `valid` int32 `[1, block_k]` (keys_axis=1),
    or transposed, `[block_k, block_q]` with `valid` `[block_k, 1]` (keys_axis=0).
    """
    allowed = valid != 0
    if pairs is not None:
        allowed = allowed & pairs
    if left is not None or right is not None:
        rel = (k_first + lax.broadcasted_iota(jnp.int32, s.shape, keys_axis)) - (
            q_first + lax.broadcasted_iota(jnp.int32, s.shape, 1 - keys_axis)
        )
        if left is not None:
            allowed = allowed & (rel >= -left)
        if right is not None:
            allowed = allowed & (rel <= right)
    return jnp.where(allowed, s, MASK_VALUE)


def _sub_block_index(shape, axis: int, first: int, sub_block: int, count: int):
    """int32 of `shape`: the sub-block (of `count` per block) holding each position along `axis`.

    Positions are `first + iota` within the kernel block; counted by comparisons
    rather than divided, as the sub-block need not be a power of two.
    """
    position = first + lax.broadcasted_iota(jnp.int32, shape, axis)
    index = jnp.zeros(shape, jnp.int32)
    for j in range(1, count):
        index = index + (position >= j * sub_block).astype(jnp.int32)
    return index


def sub_block_pairs(shape, sub_mask, *, k_first: int, sub_block: int, sub_blocks_q: int, sub_blocks_k: int,
                    keys_axis: int = 1):
    """bool of `shape`: whether a visit's sub-mask attends the (query sub-block, key sub-block) pair of each score.

    `shape` is the scores' (`keys_axis` as in `masked`); their first key is
    `k_first` (static) positions into the key block, their first query the
    query block's first. Bit `a * sub_blocks_k + b` of the int32 scalar
    `sub_mask` says whether query sub-block a attends key sub-block b
    (`block_layout.BlockLayout.sub_block`).
    """
    a = _sub_block_index(shape, 1 - keys_axis, 0, sub_block, sub_blocks_q)
    b = _sub_block_index(shape, keys_axis, k_first, sub_block, sub_blocks_k)
    bits = jnp.full(shape, sub_mask, jnp.int32)
    return (lax.shift_right_logical(bits, a * sub_blocks_k + b) & 1) != 0


def online_update(m, l, acc, s, v, dots):
    """One visit of the online softmax: m, l `[block_q, 1]`, acc `[block_q, d]`, all float32.

    The normaliser l sums the float32 weights; p @ v takes them as `dots` operands.
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + dots(p, v, NN)
    return m_new, l_new, acc_new


def finalize(m, l, acc):
    """(out, natural lse `[block_q, 1]`); a row whose running max is still MASK_VALUE attended nothing."""
    has_key = m > MASK_VALUE / 2
    l_safe = jnp.where(has_key, l, 1.0)
    out = jnp.where(has_key, acc / l_safe, 0.0)
    lse = jnp.where(has_key, (m + jnp.log2(l_safe)) / LOG2E, MASK_VALUE)
    return out, lse


def probs_and_dscores(s, lse2, row_term, do, v, dots):
    """p = exp2(s - lse2) and ds = p * (dp + row_term), with dp = do @ v.T; float32.

    Transposed (s `[block_k, block_q]`, lse2 and row_term `[1, block_q]`), pass
    (v, do) for (do, v): dp.T = v @ do.T.
    """
    p = jnp.exp2(s - lse2)
    ds = p * (dots(do, v, NT) + row_term)
    return p, ds
