"""Blocked band attention with a flash-style custom VJP, in pure JAX.

Query i attends keys `i - left .. i + right` (an undilated window). The
sequence is cut into query blocks of length B; block a attends the key span
of the whole key blocks around it that its window reaches (`before` blocks
to the left, `after` to the right), with the band and key validity masked
inside it. Keys are padded by those blocks at both ends, so every span has
one static shape, the band mask is static and so is the relative shift. A
`lax.scan` walks the blocks, so the scores of one block at a time are live:
they stay in cache instead of streaming `seq * span` floats through memory
several times, which is what bounds a fully batched formulation on CPU
(about 2x slower, measured).

The backward pass recomputes each block's scores from the saved
log-sum-exp (flash attention's recipe). Key block a receives its last
contribution from query block a, so the scan carries the partial key and
value gradients of the key blocks still open and emits one finished block
per step, instead of updating a whole-sequence accumulator each step. It
accepts a cotangent for the log-sum-exp, so results can be merged with other
partial attentions exactly.

With Transformer-XL relative positions (`relative.py`) each block adds the
position term of the offsets its band can have: one `[B, left + right + 1]`
product of the position queries with those offsets' embeddings, skewed into
the key span.

Layout: `[batch, heads, seq, head_dim]`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import MASK_VALUE, backward_row_terms
from longjax.attention import flash_step
from longjax.attention import relative as relative_lib
from longjax.attention.flash_step import attend, pad_seq, slice_seq, stack_blocks
from longjax.attention.partial_softmax import PartialAttention

# Relative FLOP rate of one scan step by block length: XLA:CPU's small batched
# dots cost far more per FLOP (measured at seq 16384, window 256, 12 heads of 64,
# on 2 cores; 192 and 256 were within noise of each other).
_BLOCK_EFFICIENCY = {16: 0.3, 32: 0.49, 64: 0.63, 128: 0.9, 256: 1.0, 512: 1.0, 1024: 1.0}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _efficiency(block: int) -> float:
    smaller = [b for b in sorted(_BLOCK_EFFICIENCY) if b <= block]
    if not smaller:
        return _BLOCK_EFFICIENCY[min(_BLOCK_EFFICIENCY)] * block / min(_BLOCK_EFFICIENCY)
    return _BLOCK_EFFICIENCY[smaller[-1]]


def choose_block_size(seq: int, left: int, right: int) -> int:
    """Query-block length minimising the estimated cost of the blocked band.

    Candidates are the tabulated lengths below `seq` and one block covering the
    whole (8-aligned) sequence, which is best for short inputs.
    """
    largest = max(_BLOCK_EFFICIENCY)
    candidates = [b for b in _BLOCK_EFFICIENCY if b < seq] + [min(8 * _cdiv(seq, 8), largest)]

    def cost(block):
        geometry = _Geometry.of(seq, left, right, block)
        return geometry.num_blocks * block * geometry.span / _efficiency(block)

    return min(candidates, key=cost)


class _Geometry(NamedTuple):
    """The static shape of the blocked band.

    Query block a (rows `a*B ..`) attends padded keys `a*B .. a*B + span`,
    which are keys `(a - before)*B ..` of the sequence: the `before` key blocks
    left of it, its own, and `after` blocks right of it. Neither side needs
    more blocks than the sequence has, which keeps short inputs to one span.
    """

    seq: int
    block: int
    num_blocks: int
    before: int
    after: int

    @classmethod
    def of(cls, seq: int, left: int, right: int, block: int) -> "_Geometry":
        num_blocks = _cdiv(seq, block)
        return cls(
            seq, block, num_blocks,
            before=min(_cdiv(left, block), num_blocks - 1), after=min(_cdiv(right, block), num_blocks - 1),
        )

    @property
    def span(self) -> int:
        return (self.before + 1 + self.after) * self.block

    @property
    def padded_keys(self) -> int:
        return (self.before + self.num_blocks + self.after) * self.block

    def pad_keys(self, x):
        """`[batch, heads, seq, ...]` -> the padded keys `[batch, heads, padded_keys, ...]`."""
        front = self.before * self.block
        return pad_seq(x, front, self.padded_keys - front - self.seq)

    def unpad_keys(self, x):
        return x[:, :, self.before * self.block: self.before * self.block + self.seq]

    def pad_queries(self, x):
        return pad_seq(x, 0, self.num_blocks * self.block - self.seq)

    def band_mask(self, left: int, right: int):
        """bool `[block, span]`: key s of the span is in row r's window (the same for every block)."""
        key_minus_query = np.arange(self.span)[None, :] - self.before * self.block - np.arange(self.block)[:, None]
        return jnp.asarray((key_minus_query >= -left) & (key_minus_query <= right))

    def relative_shift(self, left: int) -> int:
        """Where key 0 of row 0 reads in a block's descending offsets (`relative.skew`).

        Key s of row r has offset `before*B + r - s`, the row `left - offset` of
        `relative.offset_rows`.
        """
        return left - self.before * self.block


def band_attention(q, k, v, key_valid, *, left: int, right: int, block: int, scale: float, relative=None):
    """Undilated band attention.

    Args:
      q, k, v: `[batch, heads, seq, head_dim]`.
      key_valid: bool `[batch, seq]`; invalid keys are never attended.
      left, right: window extent on each side, >= 0.
      block: query-block length.
      scale: score multiplier.
      relative: None, or `(queries, rows)`: the position queries `[batch, heads,
        seq, head_dim]` (q's dtype) and the embeddings of the offsets `left,
        left - 1, ..., -right` (`relative.offset_rows`), `[heads, left + right + 1,
        head_dim]`; query i's score of key j gains `queries_i . rows[left - (i - j)]`
        before scaling.

    Returns:
      PartialAttention: out float32 `[batch, heads, seq, head_dim]` and lse
      float32 `[batch, heads, seq]`.
    """
    scaled = lambda x: (x * scale).astype(x.dtype)
    if relative is not None:
        queries, rows = relative
        relative = (scaled(queries), rows.astype(queries.dtype))
    return PartialAttention(*_band(scaled(q), k, v, key_valid, relative, left, right, block))


def _padded_inputs(geometry: _Geometry, q, k, v, key_valid, relative):
    qp = geometry.pad_queries(q)
    kp, vp = geometry.pad_keys(k), geometry.pad_keys(v)
    validp = geometry.pad_keys(key_valid[:, None])[:, 0]
    rel_queries = None if relative is None else geometry.pad_queries(relative[0])
    return qp, kp, vp, validp, rel_queries


def _block_scores(geometry, a, qp, kp, validp, band, rel_queries, rows, left):
    """Masked float32 scores `[batch, heads, block, span]` of query block a, and its slices."""
    q_blk, k_span = slice_seq(qp, a * geometry.block, geometry.block), slice_seq(kp, a * geometry.block, geometry.span)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_span, preferred_element_type=jnp.float32)
    rel_blk = None
    if rel_queries is not None:
        rel_blk = slice_seq(rel_queries, a * geometry.block, geometry.block)
        by_offset = jnp.einsum("bhqd,hwd->bhqw", rel_blk, rows, preferred_element_type=jnp.float32)
        scores = scores + relative_lib.skew(by_offset, shift=geometry.relative_shift(left), span=geometry.span)
    valid = jax.lax.dynamic_slice_in_dim(validp, a * geometry.block, geometry.span, axis=1)
    mask = band[None, None] & valid[:, None, None, :]
    return jnp.where(mask, scores, MASK_VALUE), q_blk, k_span, rel_blk


def _forward(q, k, v, key_valid, relative, left, right, block):
    geometry = _Geometry.of(q.shape[2], left, right, block)
    qp, kp, vp, validp, rel_queries = _padded_inputs(geometry, q, k, v, key_valid, relative)
    rows = None if relative is None else relative[1]
    band = geometry.band_mask(left, right)

    def step(_, a):
        scores, *_ = _block_scores(geometry, a, qp, kp, validp, band, rel_queries, rows, left)
        return None, attend(scores, slice_seq(vp, a * block, geometry.span))

    _, (out, lse) = jax.lax.scan(step, None, jnp.arange(geometry.num_blocks))
    return stack_blocks(out, geometry.seq), stack_blocks(lse, geometry.seq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _band(q, k, v, key_valid, relative, left, right, block):
    """q and the relative queries come multiplied by the score scale."""
    return _forward(q, k, v, key_valid, relative, left, right, block)


def _band_fwd(q, k, v, key_valid, relative, left, right, block):
    out, lse = _forward(q, k, v, key_valid, relative, left, right, block)
    return (out, lse), (q, k, v, key_valid, relative, out, lse)


def _band_bwd(left, right, block, residuals, cotangents):
    q, k, v, key_valid, relative, out, lse = residuals
    d_out, d_lse = cotangents
    geometry = _Geometry.of(q.shape[2], left, right, block)
    qp, kp, vp, validp, rel_queries = _padded_inputs(geometry, q, k, v, key_valid, relative)
    rows = None if relative is None else relative[1]
    band = geometry.band_mask(left, right)
    row_term, lse = backward_row_terms(out, lse, d_out, d_lse)
    d_outp, row_term, lse = (geometry.pad_queries(x) for x in (d_out.astype(q.dtype), row_term, lse))
    # The products of probabilities and score gradients run in the inputs' dtype (as the
    # kernels do), accumulating in float32.
    operand = lambda x: x.astype(q.dtype)
    dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    open_blocks = (geometry.before + geometry.after) * block

    def step(carry, a):
        dk_open, dv_open, d_rows = carry
        scores, q_blk, k_span, rel_blk = _block_scores(geometry, a, qp, kp, validp, band, rel_queries, rows, left)
        rows_of = lambda x: slice_seq(x, a * block, block)
        v_span = slice_seq(vp, a * block, geometry.span)
        probs, d_scores = flash_step.score_grads(scores, rows_of(lse), rows_of(row_term), v_span, rows_of(d_outp))
        dq_blk = dot("bhqk,bhkd->bhqd", operand(d_scores), k_span)
        dk = dot("bhqk,bhqd->bhkd", operand(d_scores), q_blk)
        dv = dot("bhqk,bhqd->bhkd", operand(probs), rows_of(d_outp))
        d_rel_blk = None
        if rel_blk is not None:
            d_by_offset = relative_lib.unskew(d_scores, shift=geometry.relative_shift(left), width=rows.shape[1])
            d_rel_blk = dot("bhqw,hwd->bhqd", operand(d_by_offset), rows)
            d_rows = d_rows + dot("bhqw,bhqd->hwd", operand(d_by_offset), rel_blk)
        # The span's first key block is finished: no later query block reaches it.
        dk = dk + pad_seq(dk_open, 0, block)
        dv = dv + pad_seq(dv_open, 0, block)
        finished = (dk[:, :, :block], dv[:, :, :block])
        return (dk[:, :, block:], dv[:, :, block:], d_rows), (dq_blk, d_rel_blk, finished)

    b, h, _, d = q.shape
    # zeros_like keeps the inputs' per-device variance under shard_map, which the carry must match.
    open_zeros = jnp.zeros_like(q, jnp.float32, shape=(b, h, open_blocks, d))
    d_rows0 = None if rows is None else jnp.zeros_like(rel_queries, jnp.float32, shape=rows.shape)
    (dk_open, dv_open, d_rows), (dq, d_rel, (dk, dv)) = jax.lax.scan(
        step, (open_zeros, open_zeros, d_rows0), jnp.arange(geometry.num_blocks)
    )
    # Padded key blocks 0 .. num_blocks-1 were finished in the scan, the last ones are still open.
    dk = geometry.unpad_keys(jnp.concatenate([stack_blocks(dk, geometry.num_blocks * block), dk_open], axis=2))
    dv = geometry.unpad_keys(jnp.concatenate([stack_blocks(dv, geometry.num_blocks * block), dv_open], axis=2))
    d_relative = None
    if relative is not None:
        d_relative = (stack_blocks(d_rel, geometry.seq).astype(relative[0].dtype), d_rows.astype(rows.dtype))
    return (
        stack_blocks(dq, geometry.seq).astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        None,
        d_relative,
    )


_band.defvjp(_band_fwd, _band_bwd)
