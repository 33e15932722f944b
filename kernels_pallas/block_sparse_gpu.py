"""The Triton (GPU) lowering of the block-sparse flash kernels: forward, dq and dk/dv.

One program per (query block, batch, head) loops over its layout row; K and V
stay in global memory and are sliced per visit. Block lengths are powers of
two (at least 16 when compiled, for `tl.dot`). Float32 inputs run their
matmuls with bfloat16 operands and float32 accumulation (tensor cores, as
FlashAttention; `block_sparse_visit.dots_for`).

The head is not padded in HBM: Triton tiles have power-of-two sizes, so every
`[block, head_dim]` tile is `[block, kernel_head_dim(head_dim)]` wide, loaded
with a mask over the real head_dim (zeros beyond it, which add nothing to
q.k and give output columns that are never stored) and stored with the same
mask. The row stride stays `heads * head_dim`, so no copy of q, k, v, the
cotangent or the gradients is made to widen the head (as JAX's own Pallas
GPU attention).

`forward` and `backward` take `[batch, seq, heads, head_dim]` arrays padded to
the call's kernel length (in `seq` only) and the call's static configuration
(`block_sparse_flash._Config`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import block_layout, common
from kernels_pallas import block_sparse_visit as visit
from kernels_pallas.common import MASK_VALUE

# Triton's tl.dot needs every dimension >= 16.
TRITON_MIN_DOT = 16


def kernel_head_dim(head_dim: int, interpret: bool) -> int:
    """The width of the kernels' head tiles: the next power of two (>= 16 when compiled, for `tl.dot`)."""
    width = common.next_power_of_two(head_dim)
    return width if interpret else max(TRITON_MIN_DOT, width)


def _params(config, width):
    num_warps = config.num_warps or (4 if width <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=config.num_stages)


def _head_mask(width: int, head_dim: int):
    """bool `[1, width]`, True over the real head; None when the tile is the head (no masking)."""
    if width == head_dim:
        return None
    return (lax.broadcasted_iota(jnp.int32, (1, width), 1) < head_dim)


def _load(ref, head_mask):
    """A `[rows, width]` tile, zero past the real head."""
    if head_mask is None:
        return ref[...]
    return plgpu.load(ref, mask=head_mask, other=0.0)


def _store(ref, value, head_mask):
    """Writes a `[rows, width]` tile's real head only."""
    value = value.astype(ref.dtype)
    if head_mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=head_mask)


def _layout_arrays(layout: block_layout.BlockLayout, transposed: bool):
    offsets = layout.t_offsets if transposed else layout.offsets
    codes = layout.t_codes if transposed else layout.codes
    return jnp.asarray(offsets.reshape(-1)), jnp.asarray(codes.reshape(-1))


def _whole(shape):
    """A BlockSpec for an array every program reads whole (layout lists, per-batch vectors)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _check_no_sub_blocks(layout) -> None:
    # The Triton kernels mask by band and key validity only; a layout whose visits leave out some
    # sub-block pairs (BigBird tiles spanning several slots, a TPU layout) would be attended whole.
    if layout.sub_block is not None:
        raise NotImplementedError(
            "the Triton kernels take no sub-block masks (BlockLayout.sub_block): GPU kernel blocks must lie "
            "within one BigBird slot"
        )


def forward(q, k, v, valid, config):
    layout = config.forward_layout
    _check_no_sub_blocks(layout)
    b, n, h, head_dim = q.shape
    d = kernel_head_dim(head_dim, config.interpret)
    bq, bk = layout.block_q, layout.block_k
    offsets, codes = _layout_arrays(layout, transposed=False)
    kernel = functools.partial(
        _forward_kernel, block_q=bq, block_k=bk, n_rows=layout.num_q_blocks,
        entries=layout.codes.shape[1], per_head=layout.layout_heads > 1, left=layout.left, right=layout.right,
        qk_scale=config.scale * visit.LOG2E, dots=visit.dots_for(config.backend, q.dtype), head_dim=head_dim,
    )
    per_batch = lambda length: pl.BlockSpec((None, length), lambda i, bi, hi: (bi, 0))
    whole_seq = pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    return pl.pallas_call(
        kernel,
        grid=(layout.num_q_blocks, b, h),
        in_specs=[_whole(offsets.shape), _whole(codes.shape), per_batch(layout.num_k_blocks), per_batch(n),
                  q_block, whole_seq, whole_seq],
        out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
        compiler_params=_params(config, d),
        interpret=config.interpret,
        name="block_sparse_flash_fwd",
    )(offsets, codes, visit.key_block_flags(valid, bk), valid.astype(jnp.int32), q, k, v)


def _row_range(offsets_ref, row, n_rows: int, per_head: bool, entries: int):
    """(first entry, end entry, base of the head's codes) of one layout row."""
    head = pl.program_id(2) if per_head else 0
    base = head * (n_rows + 1)
    return offsets_ref[base + row], offsets_ref[base + row + 1], head * entries


def _forward_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, dots, head_dim,
):
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    head = _head_mask(q_ref.shape[-1], head_dim)
    # Cast once, not per visit: the loop-invariant tile also holds half the registers in bf16.
    q = dots.operand(_load(q_ref, head))

    def one_visit(t, carry):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        s = visit.scores(q, _load(k_ref.at[keys, :], head), qk_scale, dots)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: visit.masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        return visit.online_update(*carry, s, _load(v_ref.at[keys, :], head), dots)

    init = (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
    )
    out, lse = visit.finalize(*lax.fori_loop(start, stop, one_visit, init))
    _store(o_ref, out, head)
    lse_ref[...] = lse.reshape(block_q)


def backward(q, k, v, valid, do, lse2, row_term, config):
    layout = config.backward_layout
    _check_no_sub_blocks(layout)
    b, n, h, head_dim = q.shape
    d = kernel_head_dim(head_dim, config.interpret)
    bq, bk = layout.block_q, layout.block_k
    flags, valid_i32 = visit.key_block_flags(valid, bk), valid.astype(jnp.int32)
    static = dict(block_q=bq, block_k=bk, entries=layout.codes.shape[1], per_head=layout.layout_heads > 1,
                  left=layout.left, right=layout.right, qk_scale=config.scale * visit.LOG2E,
                  scale=config.scale, dots=visit.dots_for(config.backend, q.dtype), head_dim=head_dim)
    per_batch = lambda length: pl.BlockSpec((None, length), lambda r, bi, hi: (bi, 0))
    whole_seq = pl.BlockSpec((None, n, None, d), lambda r, bi, hi: (bi, 0, hi, 0))
    whole_rows = pl.BlockSpec((None, None, n), lambda r, bi, hi: (bi, hi, 0))
    block_of = lambda size: pl.BlockSpec((None, size, None, d), lambda r, bi, hi: (bi, r, hi, 0))
    rows_of = lambda size: pl.BlockSpec((None, None, size), lambda r, bi, hi: (bi, hi, r))
    params = _params(config, d)

    offsets, codes = _layout_arrays(layout, transposed=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_rows=layout.num_q_blocks, **static),
        grid=(layout.num_q_blocks, b, h),
        in_specs=[_whole(offsets.shape), _whole(codes.shape), per_batch(layout.num_k_blocks), per_batch(n),
                  block_of(bq), whole_seq, whole_seq, block_of(bq), rows_of(bq), rows_of(bq)],
        out_specs=block_of(bq),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=config.interpret,
        name="block_sparse_flash_dq",
    )(offsets, codes, flags, valid_i32, q, k, v, do, lse2, row_term)

    t_offsets, t_codes = _layout_arrays(layout, transposed=True)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n_rows=layout.num_k_blocks, **static),
        grid=(layout.num_k_blocks, b, h),
        in_specs=[_whole(t_offsets.shape), _whole(t_codes.shape), per_batch(layout.num_k_blocks), per_batch(n),
                  whole_seq, block_of(bk), block_of(bk), whole_seq, whole_rows, whole_rows],
        out_specs=[block_of(bk), block_of(bk)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=config.interpret,
        name="block_sparse_flash_dkv",
    )(t_offsets, t_codes, flags, valid_i32, q, k, v, do, lse2, row_term)
    return dq, dk, dv


def _dq_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, dq_ref, *,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, dots, head_dim,
):
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    head = _head_mask(q_ref.shape[-1], head_dim)
    q, do = dots.operand(_load(q_ref, head)), dots.operand(_load(do_ref, head))
    lse2, row_term = lse_ref[...][:, None], rt_ref[...][:, None]

    def one_visit(t, dq):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        k = dots.operand(_load(k_ref.at[keys, :], head))  # feeds two dots
        s = visit.scores(q, k, qk_scale, dots)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: visit.masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        _, ds = visit.probs_and_dscores(s, lse2, row_term, do, _load(v_ref.at[keys, :], head), dots)
        return dq + dots(ds, k, visit.NN)

    dq = lax.fori_loop(start, stop, one_visit, jnp.zeros(q.shape, jnp.float32))
    _store(dq_ref, dq * scale, head)


def _dkv_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, dk_ref, dv_ref,
    *, block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, dots, head_dim,
):
    # Scores transposed, `[block_k, block_q]` (as Triton's fused-attention backward): p.T and
    # ds.T come out as the left operands of dv += p.T @ do and dk += ds.T @ q, and q, do enter
    # as right operands, with no register transposes. At head_dim 128 with float32 inputs
    # (tiles loaded as float32, then cast) the untransposed form spilled ~190 B.
    j = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, j, n_rows, per_head, entries)
    head = _head_mask(k_ref.shape[-1], head_dim)
    k, v = dots.operand(_load(k_ref, head)), dots.operand(_load(v_ref, head))
    valid_col = valid_ref[pl.ds(j * block_k, block_k)][:, None]
    needs_valid = flags_ref[j]

    def one_visit(t, carry):
        dk, dv = carry
        code = codes_ref[code_base + t]
        qb = code // 2
        rows = pl.ds(qb * block_q, block_q)
        q, do = dots.operand(_load(q_ref.at[rows, :], head)), dots.operand(_load(do_ref.at[rows, :], head))
        s_t = visit.scores(k, q, qk_scale, dots)
        s_t = lax.cond(
            (code % 2 + needs_valid) > 0,
            lambda s: visit.masked(s, qb * block_q, j * block_k, valid_col, left, right, keys_axis=0),
            lambda s: s,
            s_t,
        )
        p_t, ds_t = visit.probs_and_dscores(s_t, lse_ref[rows][None, :], rt_ref[rows][None, :], v, do, dots)
        dv = dv + dots(p_t, do, visit.NN)
        dk = dk + dots(ds_t, q, visit.NN)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, stop, one_visit, (zeros, zeros))
    _store(dk_ref, dk * scale, head)
    _store(dv_ref, dv, head)
