"""Block-sparse flash attention in Pallas: forward, dq and dk/dv kernels for GPU and TPU.

Each query block visits the key blocks its `BlockLayout` lists: an online
softmax with float32 running max and sum in base 2 (`exp2` of scores scaled by
`scale * log2(e)`), float32 accumulation, and outputs `out` and the per-row
log-sum-exp (natural log), so partial results merge exactly. A visit is full
(no masking work) or partial (the band mask computed in-kernel from the
layout's band); a per-token key-validity vector (padding, keys attended
elsewhere, the padded tail) is applied only to key blocks that hold an invalid
key, which a per-(batch, key block) flag says. No dense mask is passed in.

The backward pass is a `jax.custom_vjp` with two kernels, flash-attention-2
style: dq walks the layout by query block, dk/dv walks the transposed layout
(the query blocks that see each key block), so neither needs atomics. It
accepts a cotangent for the log-sum-exp: `ds = p * (dp + d_lse - rowsum(do * o))`.

Two lowerings of the same math:
* GPU (Triton): one program per (query block, batch, head) loops over its
  layout row; K and V stay in global memory and are sliced per visit. Block
  lengths are powers of two (at least 16 when compiled, for `tl.dot`), and
  head_dim is zero-padded to one.
* TPU (Mosaic): the grid walks a flattened list of visits per head
  `(batch, head, visit)`, with the list scalar-prefetched into SMEM and used by
  the BlockSpec index maps, so only visited blocks are DMA'd; accumulators
  live in VMEM scratch across the visits of a row. Blocks are multiples of 8
  (sublanes), best multiples of 128.

What to attend comes as a `Pattern` (its kernel length and its
`BlockLayout`s), built above this module by `longjax.attention.kernel_layouts`.
`block_sizes` is a `GpuBlockSizes` or `TpuBlockSizes`; its type selects the
lowering, so a CPU host can export either. Every kernel takes `interpret=`.

Layout at this module's boundary: `[batch, seq, heads, head_dim]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import block_layout, common
from kernels_pallas.common import MASK_VALUE

LOG2E = math.log2(math.e)
# Triton's tl.dot needs every dimension >= 16.
_TRITON_MIN_DOT = 16
# Widest (padded) head the Triton kernels take, as FlashAttention's GPU kernels.
_GPU_MAX_HEAD_DIM = 256
_TPU_SUBLANES = 8


def _is_power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and x & (x - 1) == 0


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Block lengths of the Triton lowering; all powers of two.

    Attributes:
      block_q, block_k: query and key block of the forward kernel.
      block_q_bwd, block_k_bwd: query and key block of the dq and dk/dv kernels.
      num_warps: warps per program; None: 4 up to head_dim 64, else 8.
      num_stages: software-pipelining stages of the key loop.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if not _is_power_of_two(value):
                raise ValueError(f"GpuBlockSizes.{name} must be a power of two, got {value!r}")
        if self.num_warps is not None and not (_is_power_of_two(self.num_warps) and self.num_warps <= 32):
            raise ValueError(f"GpuBlockSizes.num_warps must be None or a power of two <= 32, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
            raise ValueError(f"GpuBlockSizes.num_stages must be an int >= 1, got {self.num_stages!r}")


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Block lengths of the Mosaic lowering; multiples of 8 (128 keeps the MXU and lanes full).

    Attributes:
      block_q, block_k: query and key block of the forward kernel.
      block_q_bwd, block_k_bwd: query and key block of the dq and dk/dv kernels.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % _TPU_SUBLANES:
                raise ValueError(f"TpuBlockSizes.{name} must be a positive multiple of 8, got {value!r}")


BlockSizes = GpuBlockSizes | TpuBlockSizes


def default_block_sizes(block_sizes: BlockSizes | None) -> BlockSizes:
    """The given block sizes, or the default backend's defaults (GPU's on CPU, for interpret mode)."""
    if block_sizes is None:
        return TpuBlockSizes() if jax.default_backend() == "tpu" else GpuBlockSizes()
    if not isinstance(block_sizes, (GpuBlockSizes, TpuBlockSizes)):
        raise ValueError(
            "block_sizes must be None, a kernels_pallas.block_sparse_flash.GpuBlockSizes or TpuBlockSizes, "
            f"got {type(block_sizes).__module__}.{type(block_sizes).__qualname__}"
        )
    return block_sizes


def allowed_block(length: int, block_sizes: BlockSizes, interpret: bool) -> int:
    """The smallest kernel block length the lowering allows that covers `length` positions."""
    if isinstance(block_sizes, TpuBlockSizes):
        return common.round_up(length, _TPU_SUBLANES)
    if interpret:
        return _next_power_of_two(length)
    return max(_TRITON_MIN_DOT, _next_power_of_two(length))


class Pattern(Protocol):
    """What the kernels ask of an attention pattern: its kernel length and its layouts.

    A pattern is a static, hashable description (it is part of the kernels'
    static configuration); `longjax.attention.kernel_layouts` defines the band
    and BigBird patterns.
    """

    @property
    def kernel_len(self) -> int:
        """Positions of the kernel's inputs (before padding to whole blocks)."""

    def fit(self, block: int, block_sizes: BlockSizes, interpret: bool, name: str) -> int:
        """The kernel block length to use for the requested `block_sizes.<name>` = block.

        Raises NotImplementedError when the pattern cannot take such a block.
        """

    def padded_len(self, blocks: tuple[int, ...]) -> int:
        """The padded kernel length for the (fitted) block lengths: a multiple of each, >= kernel_len."""

    def layout(self, block_q: int, block_k: int, padded_len: int) -> block_layout.BlockLayout:
        """The blocks to visit with these block lengths over `padded_len` positions."""


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one kernel call."""

    pattern: Pattern
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    backend: str  # 'gpu' or 'tpu'
    num_warps: int | None
    num_stages: int
    scale: float
    interpret: bool

    @property
    def padded_len(self) -> int:
        """One kernel length for the forward and backward layouts, so every row is written by both."""
        return self.pattern.padded_len((self.block_q, self.block_k, self.block_q_bwd, self.block_k_bwd))

    @property
    def forward_layout(self) -> block_layout.BlockLayout:
        return self.pattern.layout(self.block_q, self.block_k, self.padded_len)

    @property
    def backward_layout(self) -> block_layout.BlockLayout:
        return self.pattern.layout(self.block_q_bwd, self.block_k_bwd, self.padded_len)


# --- the public wrapper ------------------------------------------------------------------------


def block_sparse_flash(q, k, v, key_valid, *, pattern, scale: float, block_sizes=None, interpret=None):
    """Block-sparse flash attention over a band or BigBird pattern.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one shape and dtype; `seq` is
        the pattern's kernel length (`seq_len` for a band; `num_blocks * slot`
        for BigBird, whose tokens the caller has placed in slots).
      key_valid: bool `[batch, seq]`; keys that are False are never attended.
      pattern: a `Pattern`, e.g. `longjax.attention.kernel_layouts.BandPattern`
        or `BigBirdPattern`.
      scale: score multiplier.
      block_sizes: `GpuBlockSizes` (Triton) or `TpuBlockSizes` (Mosaic); None:
        the default backend's defaults.
      interpret: run the kernels in the Pallas interpreter; None: on a CPU backend.

    Returns:
      out `[batch, seq, heads, head_dim]` in q's dtype, zero for rows that
      attend nothing; lse float32 `[batch, heads, seq]`, `MASK_VALUE` for them.
    """
    block_sizes = default_block_sizes(block_sizes)
    interpret = common.resolve_interpret(interpret)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or x.shape != q.shape or x.dtype != q.dtype:
            raise ValueError(
                f"{name} must be [batch, seq, heads, head_dim] like q {q.shape} {q.dtype}, got {x.shape} {x.dtype}"
            )
    batch, seq, _, head_dim = q.shape
    if key_valid.shape != (batch, seq) or key_valid.dtype != jnp.bool_:
        raise ValueError(
            f"key_valid must be bool [batch, seq] = {(batch, seq)}, got {key_valid.shape} {key_valid.dtype}"
        )
    if seq != pattern.kernel_len:
        raise ValueError(f"q has {seq} positions but the pattern expects {pattern.kernel_len}")
    is_gpu = isinstance(block_sizes, GpuBlockSizes)
    fitted = {
        name: pattern.fit(getattr(block_sizes, name), block_sizes, interpret, name)
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    }
    if is_gpu and not interpret:
        small = {n: b for n, b in fitted.items() if b < _TRITON_MIN_DOT}
        if small:
            raise ValueError(f"compiled Triton needs blocks >= {_TRITON_MIN_DOT} (tl.dot), got {small}")
    config = _Config(
        pattern=pattern, **fitted, backend="gpu" if is_gpu else "tpu",
        num_warps=getattr(block_sizes, "num_warps", None), num_stages=getattr(block_sizes, "num_stages", 1),
        scale=float(scale), interpret=interpret,
    )
    padded = config.padded_len
    dim = head_dim
    if is_gpu:
        dim = _next_power_of_two(head_dim) if interpret else max(_TRITON_MIN_DOT, _next_power_of_two(head_dim))
    if is_gpu and not interpret and dim > _GPU_MAX_HEAD_DIM:
        # Each program keeps [block, head_dim] tiles in registers and shared memory;
        # wider heads (e.g. 64 + Transformer-XL's d_model position features) do not
        # fit at these block sizes, and a Triton compile error would not fall back.
        raise NotImplementedError(
            f"the Triton kernels take head_dim up to {_GPU_MAX_HEAD_DIM}, got {head_dim} "
            f"(padded to {dim}); impl='xla' serves it"
        )
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, dim - head_dim)))
    valid = jnp.pad(key_valid, ((0, 0), (0, padded - seq)))
    out, lse = _flash(pad(q), pad(k), pad(v), valid, config)
    return out[:, :seq, :, :head_dim], lse[:, :, :seq]


# --- custom VJP ----------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, valid, config: _Config):
    return _forward(q, k, v, valid, config)


def _flash_fwd(q, k, v, valid, config):
    out, lse = _forward(q, k, v, valid, config)
    return (out, lse), (q, k, v, valid, out, lse)


def _flash_bwd(config, residuals, cotangents):
    q, k, v, valid, out, lse = residuals
    d_out, d_lse = cotangents
    # Per-row terms in [batch, heads, seq]; rows that attended nothing get lse = +1e30,
    # so every p = exp2(s - lse) of theirs is 0.
    row_term, lse = common.backward_row_terms(
        jnp.swapaxes(out, 1, 2).astype(jnp.float32), lse, jnp.swapaxes(d_out, 1, 2), d_lse
    )
    lse2 = jnp.where(lse < -MASK_VALUE / 2, lse * LOG2E, -MASK_VALUE)
    if config.backend == "gpu":
        dq, dk, dv = _gpu_backward(q, k, v, valid, d_out.astype(q.dtype), lse2, row_term, config)
    else:
        dq, dk, dv = _tpu_backward(q, k, v, valid, d_out.astype(q.dtype), lse2, row_term, config)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _forward(q, k, v, valid, config):
    if config.backend == "gpu":
        return _gpu_forward(q, k, v, valid, config)
    return _tpu_forward(q, k, v, valid, config)


def _key_block_flags(valid, block_k: int):
    """int32 `[batch, key_blocks]`: 1 where a key block holds an invalid key (it needs the mask)."""
    b, n = valid.shape
    return jnp.any(~valid.reshape(b, n // block_k, block_k), axis=-1).astype(jnp.int32)


def _precision(dtype):
    # Float32 inputs get float32 products (Triton would use TF32, the TPU bf16 passes).
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# --- the math of one visit, shared by both lowerings -----------------------------------------------

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims, precision):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _scores(q, k, qk_scale, precision):
    """Base-2 logits float32 `[block_q, block_k]`."""
    return _dot(q, k, _NT, precision) * qk_scale


def _masked(s, q_first, k_first, valid_row, left, right):
    """Applies key validity (`valid_row` int32 `[1, block_k]`) and the band to the logits."""
    allowed = valid_row != 0
    if left is not None or right is not None:
        rel = (k_first + lax.broadcasted_iota(jnp.int32, s.shape, 1)) - (
            q_first + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        )
        if left is not None:
            allowed = allowed & (rel >= -left)
        if right is not None:
            allowed = allowed & (rel <= right)
    return jnp.where(allowed, s, MASK_VALUE)


def _online_update(m, l, acc, s, v, precision):
    """One visit of the online softmax: m, l `[block_q, 1]`, acc `[block_q, d]`, all float32."""
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + _dot(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision)
    return m_new, l_new, acc_new


def _finalize(m, l, acc):
    """(out, natural lse `[block_q, 1]`); a row whose running max is still MASK_VALUE attended nothing."""
    has_key = m > MASK_VALUE / 2
    l_safe = jnp.where(has_key, l, 1.0)
    out = jnp.where(has_key, acc / l_safe, 0.0)
    lse = jnp.where(has_key, (m + jnp.log2(l_safe)) / LOG2E, MASK_VALUE)
    return out, lse


def _probs_and_dscores(s, lse2, row_term, do, v, precision):
    """p = exp2(s - lse2) and ds = p * (dp + row_term), with dp = do @ v.T."""
    p = jnp.exp2(s - lse2)
    ds = p * (_dot(do, v, _NT, precision) + row_term)
    return p, ds


# --- GPU (Triton) ----------------------------------------------------------------------------------


def _gpu_params(config, head_dim):
    num_warps = config.num_warps or (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=config.num_stages)


def _layout_arrays(layout: block_layout.BlockLayout, transposed: bool):
    offsets = layout.t_offsets if transposed else layout.offsets
    codes = layout.t_codes if transposed else layout.codes
    return jnp.asarray(offsets.reshape(-1)), jnp.asarray(codes.reshape(-1))


def _whole(shape):
    """A BlockSpec for an array every program reads whole (layout lists, per-batch vectors)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gpu_forward(q, k, v, valid, config):
    layout = config.forward_layout
    b, n, h, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    offsets, codes = _layout_arrays(layout, transposed=False)
    kernel = functools.partial(
        _gpu_forward_kernel, block_q=bq, block_k=bk, n_rows=layout.num_q_blocks,
        entries=layout.codes.shape[1], per_head=layout.layout_heads > 1, left=layout.left, right=layout.right,
        qk_scale=config.scale * LOG2E, precision=_precision(q.dtype),
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
        compiler_params=_gpu_params(config, d),
        interpret=config.interpret,
        name="block_sparse_flash_fwd",
    )(offsets, codes, _key_block_flags(valid, bk), valid.astype(jnp.int32), q, k, v)


def _row_range(offsets_ref, row, n_rows: int, per_head: bool, entries: int):
    """(first entry, end entry, base of the head's codes) of one layout row."""
    head = pl.program_id(2) if per_head else 0
    base = head * (n_rows + 1)
    return offsets_ref[base + row], offsets_ref[base + row + 1], head * entries


def _gpu_forward_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, precision,
):
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    q = q_ref[...]

    def visit(t, carry):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        s = _scores(q, k_ref[keys, :], qk_scale, precision)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: _masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        return _online_update(*carry, s, v_ref[keys, :], precision)

    init = (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, q.shape[-1]), jnp.float32),
    )
    out, lse = _finalize(*lax.fori_loop(start, stop, visit, init))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(block_q)


def _gpu_backward(q, k, v, valid, do, lse2, row_term, config):
    layout = config.backward_layout
    b, n, h, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    flags, valid_i32 = _key_block_flags(valid, bk), valid.astype(jnp.int32)
    static = dict(block_q=bq, block_k=bk, entries=layout.codes.shape[1], per_head=layout.layout_heads > 1,
                  left=layout.left, right=layout.right, qk_scale=config.scale * LOG2E,
                  scale=config.scale, precision=_precision(q.dtype))
    per_batch = lambda length: pl.BlockSpec((None, length), lambda r, bi, hi: (bi, 0))
    whole_seq = pl.BlockSpec((None, n, None, d), lambda r, bi, hi: (bi, 0, hi, 0))
    whole_rows = pl.BlockSpec((None, None, n), lambda r, bi, hi: (bi, hi, 0))
    block_of = lambda size: pl.BlockSpec((None, size, None, d), lambda r, bi, hi: (bi, r, hi, 0))
    rows_of = lambda size: pl.BlockSpec((None, None, size), lambda r, bi, hi: (bi, hi, r))
    params = _gpu_params(config, d)

    offsets, codes = _layout_arrays(layout, transposed=False)
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, n_rows=layout.num_q_blocks, **static),
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
        functools.partial(_gpu_dkv_kernel, n_rows=layout.num_k_blocks, **static),
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


def _gpu_dq_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, dq_ref, *,
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, precision,
):
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    q, do = q_ref[...], do_ref[...]
    lse2, row_term = lse_ref[...][:, None], rt_ref[...][:, None]

    def visit(t, dq):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        k = k_ref[keys, :]
        s = _scores(q, k, qk_scale, precision)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: _masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        _, ds = _probs_and_dscores(s, lse2, row_term, do, v_ref[keys, :], precision)
        return dq + _dot(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), precision)

    dq = lax.fori_loop(start, stop, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, dk_ref, dv_ref,
    *, block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, precision,
):
    j = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, j, n_rows, per_head, entries)
    k, v = k_ref[...], v_ref[...]
    valid_row = valid_ref[pl.ds(j * block_k, block_k)][None, :]
    needs_valid = flags_ref[j]

    def visit(t, carry):
        dk, dv = carry
        code = codes_ref[code_base + t]
        qb = code // 2
        rows = pl.ds(qb * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _scores(q, k, qk_scale, precision)
        s = lax.cond(
            (code % 2 + needs_valid) > 0,
            lambda s: _masked(s, qb * block_q, j * block_k, valid_row, left, right),
            lambda s: s,
            s,
        )
        p, ds = _probs_and_dscores(s, lse_ref[rows][:, None], rt_ref[rows][:, None], do, v, precision)
        dv = dv + _dot(p.astype(do.dtype), do, _TN, precision)
        dk = dk + _dot(ds.astype(q.dtype), q, _TN, precision)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, stop, visit, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- TPU (Mosaic) ----------------------------------------------------------------------------------


def _tpu_params():
    # Batch and heads split across cores; the visit axis carries the accumulators.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tpu_visits(layout: block_layout.BlockLayout, transposed: bool):
    rows, cols, flags = layout.flattened(transposed)
    return rows.shape[1], layout.layout_heads > 1, tuple(jnp.asarray(x.reshape(-1)) for x in (rows, cols, flags))


def _visit_index(bi, hi, e, length, per_head):
    return (hi * length if per_head else 0) + e


def _tpu_forward(q, k, v, valid, config):
    layout = config.forward_layout
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [batch, heads, seq, d]
    b, h, n, d = qt.shape
    bq, bk = layout.block_q, layout.block_k
    length, per_head, visits = _tpu_visits(layout, transposed=False)
    flags = _key_block_flags(valid, bk)
    idx = functools.partial(_visit_index, length=length, per_head=per_head)

    def q_map(bi, hi, e, rows, cols, fl, kf):
        return bi, hi, rows[idx(bi, hi, e)], 0

    def k_map(bi, hi, e, rows, cols, fl, kf):
        return bi, hi, cols[idx(bi, hi, e)], 0

    def valid_map(bi, hi, e, rows, cols, fl, kf):
        return bi, cols[idx(bi, hi, e)], 0, 0

    kernel = functools.partial(
        _tpu_forward_kernel, block_q=bq, block_k=bk, num_k_blocks=layout.num_k_blocks, index=idx,
        left=layout.left, right=layout.right, qk_scale=config.scale * LOG2E, precision=_precision(q.dtype),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, h, length),
            in_specs=[pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), k_map),
                      pl.BlockSpec((None, None, bk, d), k_map), pl.BlockSpec((None, None, 1, bk), valid_map)],
            out_specs=[pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, 1), q_map)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n, 1), jnp.float32)],
        compiler_params=_tpu_params(),
        interpret=config.interpret,
        name="block_sparse_flash_fwd",
    )(*visits, flags.reshape(-1), qt, kt, vt, _valid_blocks(valid, bk))
    return jnp.swapaxes(out, 1, 2), lse[..., 0]


def _valid_blocks(valid, block_k):
    """int32 `[batch, key_blocks, 1, block_k]`: per key block a row vector, a legal Mosaic block."""
    b, n = valid.shape
    return valid.astype(jnp.int32).reshape(b, n // block_k, 1, block_k)


def _visit(flags_ref, kflags_ref, e_index, kb, num_k_blocks, when_masked, when_full):
    """Runs the visit's body, masked if its block is partial or holds an invalid key."""
    flag = flags_ref[e_index]
    needs_mask = ((flag & block_layout.FLAG_PARTIAL) + kflags_ref[pl.program_id(0) * num_k_blocks + kb]) > 0
    compute = (flag & block_layout.FLAG_COMPUTE) != 0
    pl.when(compute & needs_mask)(when_masked)
    pl.when(compute & jnp.logical_not(needs_mask))(when_full)


def _tpu_forward_kernel(
    rows_ref, cols_ref, flags_ref, kflags_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref,
    m_ref, l_ref, acc_ref, *, block_q, block_k, num_k_blocks, index, left, right, qk_scale, precision,
):
    e = index(pl.program_id(0), pl.program_id(1), pl.program_id(2))
    flag = flags_ref[e]
    qb, kb = rows_ref[e], cols_ref[e]

    @pl.when((flag & block_layout.FLAG_FIRST) != 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        def body():
            s = _scores(q_ref[...], k_ref[...], qk_scale, precision)
            if masked:
                s = _masked(s, qb * block_q, kb * block_k, valid_ref[...], left, right)
            m, l, acc = _online_update(m_ref[...], l_ref[...], acc_ref[...], s, v_ref[...], precision)
            m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

        return body

    _visit(flags_ref, kflags_ref, e, kb, num_k_blocks, update(True), update(False))

    @pl.when((flag & block_layout.FLAG_LAST) != 0)
    def _write():
        out, lse = _finalize(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_backward(q, k, v, valid, do, lse2, row_term, config):
    layout = config.backward_layout
    qt, kt, vt, dot_ = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
    b, h, _, d = qt.shape
    bq, bk = layout.block_q, layout.block_k
    flags = _key_block_flags(valid, bk).reshape(-1)
    valid_blocks = _valid_blocks(valid, bk)
    lse2, row_term = lse2[..., None], row_term[..., None]  # [batch, heads, seq, 1]: column blocks
    static = dict(block_q=bq, block_k=bk, num_k_blocks=layout.num_k_blocks, left=layout.left, right=layout.right,
                  qk_scale=config.scale * LOG2E, scale=config.scale, precision=_precision(q.dtype))

    def specs(length, per_head, q_side: str):
        """BlockSpecs of (q-side block, k-side block, valid) when the visit list's rows are q_side."""
        idx = functools.partial(_visit_index, length=length, per_head=per_head)
        rows_are_q = q_side == "rows"

        def q_map(bi, hi, e, rows, cols, fl, kf):
            return bi, hi, (rows if rows_are_q else cols)[idx(bi, hi, e)], 0

        def k_map(bi, hi, e, rows, cols, fl, kf):
            return bi, hi, (cols if rows_are_q else rows)[idx(bi, hi, e)], 0

        def valid_map(bi, hi, e, rows, cols, fl, kf):
            return bi, (cols if rows_are_q else rows)[idx(bi, hi, e)], 0, 0

        return idx, q_map, k_map, valid_map

    length, per_head, visits = _tpu_visits(layout, transposed=False)
    idx, q_map, k_map, valid_map = specs(length, per_head, "rows")
    q_spec, k_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), k_map)
    col_spec = pl.BlockSpec((None, None, bq, 1), q_map)
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, index=idx, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, h, length),
            in_specs=[q_spec, k_spec, k_spec, pl.BlockSpec((None, None, 1, bk), valid_map), q_spec, col_spec, col_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=_tpu_params(),
        interpret=config.interpret,
        name="block_sparse_flash_dq",
    )(*visits, flags, qt, kt, vt, valid_blocks, dot_, lse2, row_term)

    length, per_head, visits = _tpu_visits(layout, transposed=True)
    idx, q_map, k_map, valid_map = specs(length, per_head, "cols")
    q_spec, k_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), k_map)
    col_spec = pl.BlockSpec((None, None, bq, 1), q_map)
    dk, dv = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, index=idx, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, h, length),
            in_specs=[q_spec, k_spec, k_spec, pl.BlockSpec((None, None, 1, bk), valid_map), q_spec, col_spec, col_spec],
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=_tpu_params(),
        interpret=config.interpret,
        name="block_sparse_flash_dkv",
    )(*visits, flags, qt, kt, vt, valid_blocks, dot_, lse2, row_term)
    return tuple(jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))


def _tpu_dq_kernel(
    rows_ref, cols_ref, flags_ref, kflags_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, rt_ref, dq_ref,
    acc_ref, *, block_q, block_k, num_k_blocks, index, left, right, qk_scale, scale, precision,
):
    e = index(pl.program_id(0), pl.program_id(1), pl.program_id(2))
    flag = flags_ref[e]
    qb, kb = rows_ref[e], cols_ref[e]

    @pl.when((flag & block_layout.FLAG_FIRST) != 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        def body():
            k = k_ref[...]
            s = _scores(q_ref[...], k, qk_scale, precision)
            if masked:
                s = _masked(s, qb * block_q, kb * block_k, valid_ref[...], left, right)
            _, ds = _probs_and_dscores(s, lse_ref[...], rt_ref[...], do_ref[...], v_ref[...], precision)
            acc_ref[...] += _dot(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), precision)

        return body

    _visit(flags_ref, kflags_ref, e, kb, num_k_blocks, update(True), update(False))

    @pl.when((flag & block_layout.FLAG_LAST) != 0)
    def _write():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(
    rows_ref, cols_ref, flags_ref, kflags_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, rt_ref,
    dk_ref, dv_ref, dk_acc, dv_acc, *, block_q, block_k, num_k_blocks, index, left, right, qk_scale, scale,
    precision,
):
    e = index(pl.program_id(0), pl.program_id(1), pl.program_id(2))
    flag = flags_ref[e]
    kb, qb = rows_ref[e], cols_ref[e]

    @pl.when((flag & block_layout.FLAG_FIRST) != 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(masked: bool):
        def body():
            q, do = q_ref[...], do_ref[...]
            s = _scores(q, k_ref[...], qk_scale, precision)
            if masked:
                s = _masked(s, qb * block_q, kb * block_k, valid_ref[...], left, right)
            p, ds = _probs_and_dscores(s, lse_ref[...], rt_ref[...], do, v_ref[...], precision)
            dv_acc[...] += _dot(p.astype(do.dtype), do, _TN, precision)
            dk_acc[...] += _dot(ds.astype(q.dtype), q, _TN, precision)

        return body

    _visit(flags_ref, kflags_ref, e, kb, num_k_blocks, update(True), update(False))

    @pl.when((flag & block_layout.FLAG_LAST) != 0)
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
