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

A banded score bias (Transformer-XL's relative positions, computed per offset
above the kernels) comes as float32 `[batch, seq, heads, width]` over the band
`width = left + right + 1` offsets: the bias of query i and key j is column
`left - i + j` of row i (`block_sparse_visit.band_columns`). Each visit gathers
its `[block_q, block_k]` tile with an integer-array load (masked outside the
band) and adds it to q.k before scaling; the dq kernel scatters the score
gradients back to the same columns (each (i, column) is one key, so visits
write disjoint elements) into a zero-initialised output. Without a bias the
kernels are unchanged.

A per-visit bias (BigBird's relative positions: random blocks reach any
offset, past any band) comes as float32 `[batch, seq, heads, width]` with a
column table beside the layout's codes (the pattern's `visit_bias_columns`):
a visit's keys are the consecutive columns from its table entry, the same for
every row of its query block. The loads and the dq kernel's stores are the
same integer-array ones, unmasked.
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


def _params(config, width, bias_tile: int = 0):
    """Warps: as asked, else 4 up to a 64-wide head tile and 8 above; with a score bias whose tile
    (`bias_tile` scores) exceeds 64 x 64, 8: its gathered float32 tile and int32 indices would
    otherwise spill (a 128 x 64 float32 forward at head_dim 64 spilled 328 B with 4)."""
    num_warps = config.num_warps or (4 if width <= 64 and bias_tile <= 64 * 64 else 8)
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


def _bias_spec(n: int, width: int):
    """The whole bias (or its gradient) of a (batch, head), banded or per visit: `[seq, width]`, gathered
    from per visit."""
    return pl.BlockSpec((None, n, None, width), lambda r, bi, hi: (bi, 0, hi, 0))


def _visit_columns(config, layout, transposed: bool):
    """The per-visit bias's column table by the layout's codes (`t_codes` when transposed), flattened
    int32; None for a banded bias (the pattern has no `visit_bias_columns`)."""
    tables = getattr(config.pattern, "visit_bias_columns", None)
    if tables is None:
        return None
    return jnp.asarray(tables(layout)[1 if transposed else 0].reshape(-1), jnp.int32)


def _bias_refs(refs, bias_width, per_visit: bool):
    """(bias_ref, columns_ref, outputs...) from a kernel's refs after its fixed inputs (None where absent)."""
    if bias_width is None:
        return (None, None, *refs)
    if per_visit:
        return refs
    return (refs[0], None, *refs[1:])


def _load_bias(bias_ref, shape, q_first, k_first, left, width, keys_axis=1, column_first=None):
    """A score tile's bias, float32 `shape` (`keys_axis` as in `visit.masked`); and where it sits,
    (rows, columns, inside).

    Banded (`column_first` None): `visit.band_columns`, zero outside the band. Per visit: the keys
    at the consecutive columns from `column_first` (`visit.visit_columns`); inside is None.
    """
    if column_first is not None:
        rows, columns = visit.visit_columns(shape, q_first, column_first, keys_axis)
        return plgpu.load(bias_ref.at[rows, columns]).astype(jnp.float32), (rows, columns, None)
    rows, columns, inside = visit.band_columns(shape, q_first, k_first, left, width, keys_axis)
    # Clamped where masked: the interpreter's gather reads them (then discards what it read).
    tile = plgpu.load(bias_ref.at[rows, jnp.where(inside, columns, 0)], mask=inside, other=0.0)
    return tile.astype(jnp.float32), (rows, columns, inside)


def forward(q, k, v, valid, config, bias=None):
    layout = config.forward_layout
    _check_no_sub_blocks(layout)
    width = visit.bias_width(bias)
    b, n, h, head_dim = q.shape
    d = kernel_head_dim(head_dim, config.interpret)
    bq, bk = layout.block_q, layout.block_k
    offsets, codes = _layout_arrays(layout, transposed=False)
    columns = None if bias is None else _visit_columns(config, layout, transposed=False)
    kernel = functools.partial(
        _forward_kernel, block_q=bq, block_k=bk, n_rows=layout.num_q_blocks,
        entries=layout.codes.shape[1], per_head=layout.layout_heads > 1, left=layout.left, right=layout.right,
        qk_scale=config.scale * visit.LOG2E, dots=visit.dots_for(config.backend, q.dtype), head_dim=head_dim,
        bias_width=width, per_visit=columns is not None,
    )
    per_batch = lambda length: pl.BlockSpec((None, length), lambda i, bi, hi: (bi, 0))
    whole_seq = pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    q_block = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    extra_specs, extra_args = _bias_inputs(bias, columns, n, width)
    return pl.pallas_call(
        kernel,
        grid=(layout.num_q_blocks, b, h),
        in_specs=[_whole(offsets.shape), _whole(codes.shape), per_batch(layout.num_k_blocks), per_batch(n),
                  q_block, whole_seq, whole_seq, *extra_specs],
        out_specs=[q_block, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
        compiler_params=_params(config, d, 0 if bias is None else bq * bk),
        interpret=config.interpret,
        name="block_sparse_flash_fwd" if bias is None else "block_sparse_flash_bias_fwd",
    )(offsets, codes, visit.key_block_flags(valid, bk), valid.astype(jnp.int32), q, k, v, *extra_args)


def _bias_inputs(bias, columns, n: int, width):
    """The (specs, arrays) a kernel takes after its fixed inputs: the bias, then any column table."""
    if bias is None:
        return [], []
    specs, args = [_bias_spec(n, width)], [bias]
    if columns is not None:
        specs.append(_whole(columns.shape))
        args.append(columns)
    return specs, args


def _row_range(offsets_ref, row, n_rows: int, per_head: bool, entries: int):
    """(first entry, end entry, base of the head's codes) of one layout row."""
    head = pl.program_id(2) if per_head else 0
    base = head * (n_rows + 1)
    return offsets_ref[base + row], offsets_ref[base + row + 1], head * entries


def _forward_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, *refs,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, dots, head_dim, bias_width, per_visit,
):
    bias_ref, columns_ref, o_ref, lse_ref = _bias_refs(refs, bias_width, per_visit)
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    head = _head_mask(q_ref.shape[-1], head_dim)
    # Cast once, not per visit: the loop-invariant tile also holds half the registers in bf16.
    q = dots.operand(_load(q_ref, head))

    def one_visit(t, carry):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        bias = None if bias_ref is None else _load_bias(
            bias_ref, (block_q, block_k), i * block_q, kb * block_k, left, bias_width,
            column_first=None if columns_ref is None else columns_ref[code_base + t],
        )[0]
        s = visit.scores(q, _load(k_ref.at[keys, :], head), qk_scale, dots, bias)
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


def backward(q, k, v, valid, do, lse2, row_term, config, bias=None):
    """(dq, dk, dv) without a bias; (dq, dk, dv, d_bias) with one (float32, the bias's shape)."""
    layout = config.backward_layout
    _check_no_sub_blocks(layout)
    width = visit.bias_width(bias)
    columns, t_columns = (None, None) if bias is None else (
        _visit_columns(config, layout, transposed=False), _visit_columns(config, layout, transposed=True)
    )
    b, n, h, head_dim = q.shape
    d = kernel_head_dim(head_dim, config.interpret)
    bq, bk = layout.block_q, layout.block_k
    flags, valid_i32 = visit.key_block_flags(valid, bk), valid.astype(jnp.int32)
    static = dict(block_q=bq, block_k=bk, entries=layout.codes.shape[1], per_head=layout.layout_heads > 1,
                  left=layout.left, right=layout.right, qk_scale=config.scale * visit.LOG2E,
                  scale=config.scale, dots=visit.dots_for(config.backend, q.dtype), head_dim=head_dim,
                  bias_width=width, per_visit=columns is not None)
    per_batch = lambda length: pl.BlockSpec((None, length), lambda r, bi, hi: (bi, 0))
    whole_seq = pl.BlockSpec((None, n, None, d), lambda r, bi, hi: (bi, 0, hi, 0))
    whole_rows = pl.BlockSpec((None, None, n), lambda r, bi, hi: (bi, hi, 0))
    block_of = lambda size: pl.BlockSpec((None, size, None, d), lambda r, bi, hi: (bi, r, hi, 0))
    rows_of = lambda size: pl.BlockSpec((None, None, size), lambda r, bi, hi: (bi, hi, r))
    params = _params(config, d, 0 if bias is None else bq * bk)

    offsets, codes = _layout_arrays(layout, transposed=False)
    dq_args = [offsets, codes, flags, valid_i32, q, k, v, do, lse2, row_term]
    dq_specs = [_whole(offsets.shape), _whole(codes.shape), per_batch(layout.num_k_blocks), per_batch(n),
                block_of(bq), whole_seq, whole_seq, block_of(bq), rows_of(bq), rows_of(bq)]
    dq_out_specs, dq_out_shape, aliases = block_of(bq), jax.ShapeDtypeStruct(q.shape, q.dtype), {}
    if bias is not None:
        # The bias gradient is scattered per visit into a zeroed array (aliased to the output), so
        # the columns of keys no visit reaches (past the sequence's ends) stay zero. One spare
        # column takes the interpreter's masked-out scatter (which writes every lane).
        d_bias_shape = (b, n, h, width + 1)
        bias_specs, bias_args = _bias_inputs(bias, columns, n, width)
        dq_args += bias_args + [jnp.zeros(d_bias_shape, jnp.float32)]
        dq_specs += bias_specs + [_bias_spec(n, width + 1)]
        dq_out_specs = [dq_out_specs, _bias_spec(n, width + 1)]
        dq_out_shape = [dq_out_shape, jax.ShapeDtypeStruct(d_bias_shape, jnp.float32)]
        aliases = {len(dq_args) - 1: 1}
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_rows=layout.num_q_blocks, **static),
        grid=(layout.num_q_blocks, b, h),
        in_specs=dq_specs,
        out_specs=dq_out_specs,
        out_shape=dq_out_shape,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=config.interpret,
        name="block_sparse_flash_dq" if bias is None else "block_sparse_flash_bias_dq",
    )(*dq_args)

    t_offsets, t_codes = _layout_arrays(layout, transposed=True)
    extra_specs, extra_args = _bias_inputs(bias, t_columns, n, width)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, n_rows=layout.num_k_blocks, **static),
        grid=(layout.num_k_blocks, b, h),
        in_specs=[_whole(t_offsets.shape), _whole(t_codes.shape), per_batch(layout.num_k_blocks), per_batch(n),
                  whole_seq, block_of(bk), block_of(bk), whole_seq, whole_rows, whole_rows, *extra_specs],
        out_specs=[block_of(bk), block_of(bk)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=config.interpret,
        name="block_sparse_flash_dkv" if bias is None else "block_sparse_flash_bias_dkv",
    )(t_offsets, t_codes, flags, valid_i32, q, k, v, do, lse2, row_term, *extra_args)
    if bias is None:
        return dq, dk, dv
    dq, d_bias = dq
    return dq, dk, dv, d_bias[..., :width]


def _dq_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, *refs,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, dots, head_dim, bias_width,
    per_visit,
):
    if bias_width is None:
        bias_ref, columns_ref, (dq_ref,) = None, None, refs
    else:
        # The zeroed input aliased to d_bias_ref is not read: d_bias_ref starts as it.
        bias_ref, columns_ref, _, dq_ref, d_bias_ref = _bias_refs(refs, bias_width, per_visit)
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
        bias = None
        if bias_ref is not None:
            bias, (rows, columns, inside) = _load_bias(
                bias_ref, (block_q, block_k), i * block_q, kb * block_k, left, bias_width,
                column_first=None if columns_ref is None else columns_ref[code_base + t],
            )
        s = visit.scores(q, k, qk_scale, dots, bias)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: visit.masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        _, ds = visit.probs_and_dscores(s, lse2, row_term, do, _load(v_ref.at[keys, :], head), dots)
        if bias_ref is not None:
            # ds is the gradient of the natural-log logits `scale * (q.k + bias)`: the bias's is ds * scale.
            # Masked-out lanes go to the spare last column (stored only by the interpreter).
            if inside is not None:
                columns = jnp.where(inside, columns, bias_width)
            plgpu.store(d_bias_ref.at[rows, columns], ds * scale, mask=inside)
        return dq + dots(ds, k, visit.NN)

    dq = lax.fori_loop(start, stop, one_visit, jnp.zeros(q.shape, jnp.float32))
    _store(dq_ref, dq * scale, head)


def _dkv_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, *refs,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, dots, head_dim, bias_width,
    per_visit,
):
    # Scores transposed, `[block_k, block_q]` (as Triton's fused-attention backward): p.T and
    # ds.T come out as the left operands of dv += p.T @ do and dk += ds.T @ q, and q, do enter
    # as right operands, with no register transposes. At head_dim 128 with float32 inputs
    # (tiles loaded as float32, then cast) the untransposed form spilled ~190 B.
    bias_ref, columns_ref, dk_ref, dv_ref = _bias_refs(refs, bias_width, per_visit)
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
        bias_t = None if bias_ref is None else _load_bias(
            bias_ref, (block_k, block_q), qb * block_q, j * block_k, left, bias_width, keys_axis=0,
            column_first=None if columns_ref is None else columns_ref[code_base + t],
        )[0]
        s_t = visit.scores(k, q, qk_scale, dots, bias_t)
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
