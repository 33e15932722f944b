"""Blocked band attention with a flash-style custom VJP, in pure JAX.

Query i attends keys `i - left .. i + right` (an undilated window). The
sequence is cut into query blocks of length B; block a attends the contiguous
key span `[a*B - left, a*B + B + right)` that covers its window (shifted to
stay inside the sequence), with the band and key validity masked inside it.
A `lax.scan` walks the blocks, so the scores of one block at a time are live:
they stay in cache instead of streaming `seq * span` floats through memory
several times, which is what bounds a fully batched formulation on CPU
(about 2x slower, measured).

The backward pass recomputes each block's scores from the saved
log-sum-exp (flash attention's recipe) and accumulates dk, dv into the key
span. It accepts a cotangent for the log-sum-exp, so results can be merged
with other partial attentions exactly.

Layout: `[batch, heads, seq, head_dim]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.common import backward_row_terms
from longjax.attention import flash_step
from longjax.attention.flash_step import attend, masked_scores, pad_seq, slice_seq, stack_blocks
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
        num_blocks, span = _geometry(seq, left, right, block)
        return num_blocks * block * span / _efficiency(block)

    return min(candidates, key=cost)


def band_attention(q, k, v, key_valid, *, left: int, right: int, block: int, scale: float):
    """Undilated band attention.

    Args:
      q, k, v: `[batch, heads, seq, head_dim]`.
      key_valid: bool `[batch, seq]`; invalid keys are never attended.
      left, right: window extent on each side, >= 0.
      block: query-block length.
      scale: score multiplier.

    Returns:
      PartialAttention: out float32 `[batch, heads, seq, head_dim]` and lse
      float32 `[batch, heads, seq]`.
    """
    return PartialAttention(*_band((q * scale).astype(q.dtype), k, v, key_valid, left, right, block))


def _geometry(seq: int, left: int, right: int, block: int) -> tuple[int, int]:
    """(query blocks, key-span length): block a needs keys a*B - left .. a*B + B - 1 + right."""
    num_blocks = _cdiv(seq, block)
    return num_blocks, min(block + left + right, num_blocks * block)


def _span_of_block(a, validp, *, block: int, left: int, right: int, span: int):
    """(first key, bool mask `[batch, 1, block, span]`) of query block a's key span.

    The span starts at `a*B - left`, shifted to stay inside the (padded) keys;
    the mask holds the band and key validity inside it.
    """
    start = jnp.clip(a * block - left, 0, validp.shape[1] - span)
    rel = (start + jnp.arange(span)[None, :]) - (a * block + jnp.arange(block)[:, None])
    band = (rel >= -left) & (rel <= right)
    valid = jax.lax.dynamic_slice_in_dim(validp, start, span, axis=1)
    return start, band[None, None] & valid[:, None, None, :]


def _forward(q, k, v, key_valid, left, right, block):
    seq = q.shape[2]
    num_blocks, span = _geometry(seq, left, right, block)
    keys = max(seq, span)
    qp = pad_seq(q, 0, num_blocks * block - seq)
    kp, vp = pad_seq(k, 0, keys - seq), pad_seq(v, 0, keys - seq)
    validp = jnp.pad(key_valid, ((0, 0), (0, keys - seq)))

    def step(_, a):
        start, mask = _span_of_block(a, validp, block=block, left=left, right=right, span=span)
        scores = masked_scores(slice_seq(qp, a * block, block), slice_seq(kp, start, span), mask)
        return None, attend(scores, slice_seq(vp, start, span))

    _, (out, lse) = jax.lax.scan(step, None, jnp.arange(num_blocks))
    return stack_blocks(out, seq), stack_blocks(lse, seq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _band(q, k, v, key_valid, left, right, block):
    """q comes multiplied by the score scale."""
    return _forward(q, k, v, key_valid, left, right, block)


def _band_fwd(q, k, v, key_valid, left, right, block):
    out, lse = _forward(q, k, v, key_valid, left, right, block)
    return (out, lse), (q, k, v, key_valid, out, lse)


def _band_bwd(left, right, block, residuals, cotangents):
    q, k, v, key_valid, out, lse = residuals
    d_out, d_lse = cotangents
    seq = q.shape[2]
    num_blocks, span = _geometry(seq, left, right, block)
    keys = max(seq, span)
    qpad = num_blocks * block - seq
    f32 = lambda x: x.astype(jnp.float32)
    qp = pad_seq(f32(q), 0, qpad)
    kp, vp = pad_seq(f32(k), 0, keys - seq), pad_seq(f32(v), 0, keys - seq)
    validp = jnp.pad(key_valid, ((0, 0), (0, keys - seq)))
    d_outp = pad_seq(f32(d_out), 0, qpad)
    row_term, lse = backward_row_terms(out, lse, d_out, d_lse)
    row_term, lse = pad_seq(row_term, 0, qpad), pad_seq(lse, 0, qpad)

    def step(carry, a):
        dk, dv = carry
        start, mask = _span_of_block(a, validp, block=block, left=left, right=right, span=span)
        q_start = a * block
        q_blk, k_span, v_span = slice_seq(qp, q_start, block), slice_seq(kp, start, span), slice_seq(vp, start, span)
        dq_blk, dk_span, dv_span = flash_step.attend_grads(
            masked_scores(q_blk, k_span, mask), slice_seq(lse, q_start, block),
            slice_seq(row_term, q_start, block), q_blk, k_span, v_span,
            slice_seq(d_outp, q_start, block),
        )
        dk = jax.lax.dynamic_update_slice_in_dim(dk, slice_seq(dk, start, span) + dk_span, start, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, slice_seq(dv, start, span) + dv_span, start, axis=2)
        return (dk, dv), dq_blk

    zeros = jnp.zeros_like(kp)
    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), jnp.arange(num_blocks))
    unpad = lambda x: x[:, :, :seq]
    return (
        stack_blocks(dq, seq).astype(q.dtype),
        unpad(dk).astype(k.dtype),
        unpad(dv).astype(v.dtype),
        None,
    )


_band.defvjp(_band_fwd, _band_bwd)
