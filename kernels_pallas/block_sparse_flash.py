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
  head_dim is zero-padded to one. Float32 inputs run their matmuls with
  bfloat16 operands and float32 accumulation (tensor cores, as FlashAttention).
* TPU (Mosaic): the grid walks a flattened list of visits per head
  `(batch, head, visit)`, with the list scalar-prefetched into SMEM (compacted
  to the smallest ints, `block_layout.VisitTables`, and checked against the
  chips' budgets before lowering, `tpu_footprint`) and used by
  the BlockSpec index maps, so only visited blocks are DMA'd; accumulators
  live in VMEM scratch across the visits of a row. Blocks are multiples of 8
  (sublanes), best multiples of 128. Float32 inputs keep float32 matmuls
  (`Precision.HIGHEST`).

What to attend comes as a `Pattern` (its kernel length and its
`BlockLayout`s), built above this module by `longjax.attention.kernel_layouts`.
`block_sizes` is a `GpuBlockSizes` or `TpuBlockSizes`; its type selects the
lowering, so a CPU host can export either; None lets the lowered platform
choose its defaults (`per_lowering`). Every kernel takes `interpret=`.

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

from kernels_pallas import block_layout, common, tpu_footprint
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

    Matmuls: float32 inputs run on the tensor cores with bfloat16 operands and
    float32 accumulation, as FlashAttention does: the kernels cast q, k, v,
    do and the probabilities p and score gradients ds to bfloat16 explicitly
    before each dot (in interpret mode too, so CPU tests see the GPU's
    rounding), while the softmax statistics, accumulators and outputs stay
    float32. Expect errors of a few bfloat16 roundings (2^-8 relative) against
    a float32 evaluation. bfloat16 and float16 inputs are used as they are.

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

    Matmuls: float32 inputs take float32 operands at `lax.Precision.HIGHEST`
    (float32-accurate products on the MXU); bfloat16 and float16 inputs are
    used as they are. Accumulation is float32 in every case.

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


def check_block_sizes(block_sizes) -> BlockSizes | None:
    """block_sizes itself when None, a `GpuBlockSizes` or a `TpuBlockSizes`; ValueError otherwise."""
    if block_sizes is not None and not isinstance(block_sizes, (GpuBlockSizes, TpuBlockSizes)):
        raise ValueError(
            "block_sizes must be None, a kernels_pallas.block_sparse_flash.GpuBlockSizes or TpuBlockSizes, "
            f"got {type(block_sizes).__module__}.{type(block_sizes).__qualname__}"
        )
    return block_sizes


def default_block_sizes(block_sizes: BlockSizes | None, interpret: bool) -> BlockSizes | None:
    """The block sizes a call uses when it can tell before lowering; None when the platform decides.

    Given block sizes are used as they are. For None: interpreted, the TPU
    defaults on a TPU host and the GPU defaults elsewhere; compiled on an
    accelerator, its own lowering's defaults; compiled on a CPU host (an
    export for another platform) None: `per_lowering` then traces both.
    """
    if check_block_sizes(block_sizes) is not None:
        return block_sizes
    backend = jax.default_backend()
    if interpret or backend != "cpu":
        return TpuBlockSizes() if backend == "tpu" else GpuBlockSizes()
    return None


def per_lowering(fn, *args, block_sizes: BlockSizes | None, interpret: bool):
    """`fn(blocks, *args)` with the block sizes of the lowering that runs it.

    The block sizes decide the lowering (and, above the kernels, shapes such
    as BigBird's slots), so `fn` is the whole computation that depends on
    them. When `default_block_sizes` cannot choose before lowering (block_sizes
    None, compiled, on a CPU host), both lowerings are traced, each with its
    defaults and its own checks, and `jax.lax.platform_dependent` keeps the
    lowered platform's: Mosaic for 'tpu', Triton for the others. `jax.export`
    from a CPU host then works for either platform without block sizes.

    Args:
      fn: `(blocks, *args) -> pytree of arrays`, the same shapes for either blocks.
      args: arrays (or pytrees of them) passed on to fn.
      block_sizes: None, `GpuBlockSizes` or `TpuBlockSizes`.
      interpret: whether the kernels run in the Pallas interpreter (resolved, a bool).
    """
    blocks = default_block_sizes(block_sizes, interpret)
    if blocks is not None:
        return fn(blocks, *args)

    def branch(blocks):
        def traced(*xs):
            try:
                return fn(blocks, *xs)
            except (NotImplementedError, ValueError) as e:
                # Both branches are traced whichever platform is lowered: say which refused.
                raise type(e)(
                    f"{e} [with block_sizes=None a compiled call on a CPU host traces both lowerings; this is "
                    f"the {type(blocks).__name__} one: pass GpuBlockSizes or TpuBlockSizes to trace one only]"
                ) from e

        return traced

    return jax.lax.platform_dependent(*args, tpu=branch(TpuBlockSizes()), default=branch(GpuBlockSizes()))


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
      block_sizes: `GpuBlockSizes` (Triton) or `TpuBlockSizes` (Mosaic), whose
        type selects the lowering; None: each platform's defaults, the platform
        choosing when lowering (so a CPU host can export for either; see
        `per_lowering`), and in interpret mode the TPU kernels on a TPU host,
        the GPU kernels elsewhere. The lowering sets the matmul mode: float32
        inputs get bfloat16 operands on GPU, float32 (HIGHEST) on TPU.
        A pattern whose layout depends on the lowering (BigBird's slots) must
        be built per lowering: use `per_lowering` above this call.
      interpret: run the kernels in the Pallas interpreter; None: on a CPU backend.

    Returns:
      out `[batch, seq, heads, head_dim]` in q's dtype, zero for rows that
      attend nothing; lse float32 `[batch, heads, seq]`, `MASK_VALUE` for them.
    """
    interpret = common.resolve_interpret(interpret)
    return per_lowering(
        functools.partial(_block_sparse_flash, pattern=pattern, scale=scale, interpret=interpret),
        q, k, v, key_valid, block_sizes=block_sizes, interpret=interpret,
    )


def _block_sparse_flash(block_sizes, q, k, v, key_valid, *, pattern, scale, interpret):
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
    config = _make_config(pattern, block_sizes, interpret, scale)
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


def _make_config(pattern, block_sizes: BlockSizes, interpret: bool, scale: float) -> _Config:
    """The static configuration of a call: the pattern's fitted blocks for the lowering of `block_sizes`."""
    is_gpu = isinstance(block_sizes, GpuBlockSizes)
    fitted = {
        name: pattern.fit(getattr(block_sizes, name), block_sizes, interpret, name)
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    }
    if is_gpu and not interpret:
        small = {n: b for n, b in fitted.items() if b < _TRITON_MIN_DOT}
        if small:
            raise ValueError(f"compiled Triton needs blocks >= {_TRITON_MIN_DOT} (tl.dot), got {small}")
    return _Config(
        pattern=pattern, **fitted, backend="gpu" if is_gpu else "tpu",
        num_warps=getattr(block_sizes, "num_warps", None), num_stages=getattr(block_sizes, "num_stages", 1),
        scale=float(scale), interpret=interpret,
    )


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


@dataclasses.dataclass(frozen=True)
class _Dots:
    """How a lowering runs its matmuls: operands cast to `dtype`, float32 accumulation at `precision`."""

    dtype: jnp.dtype
    precision: lax.Precision | None

    def operand(self, x):
        return x.astype(self.dtype)

    def __call__(self, a, b, dims):
        return lax.dot_general(
            self.operand(a), self.operand(b), dims, preferred_element_type=jnp.float32, precision=self.precision
        )


def _dots(backend: str, dtype) -> _Dots:
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
            return _Dots(jnp.dtype(jnp.bfloat16), None)
        return _Dots(dtype, lax.Precision.HIGHEST)
    return _Dots(dtype, None)


def dot_operand_dtype(block_sizes: BlockSizes, dtype) -> jnp.dtype:
    """The dtype the lowering that `block_sizes` selects casts matmul operands to, for inputs of `dtype`.

    bfloat16 for float32 inputs of the Triton lowering, else the inputs' dtype
    (see `GpuBlockSizes`); accumulation is float32 in every case.
    """
    if check_block_sizes(block_sizes) is None:
        raise ValueError("block_sizes must be a GpuBlockSizes or TpuBlockSizes: it names the lowering, got None")
    backend = "gpu" if isinstance(block_sizes, GpuBlockSizes) else "tpu"
    return _dots(backend, dtype).dtype


# --- the math of one visit, shared by both lowerings -----------------------------------------------

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _scores(q, k, qk_scale, dots):
    """Base-2 logits float32 `[block_q, block_k]`."""
    return dots(q, k, _NT) * qk_scale


def _masked(s, q_first, k_first, valid, left, right, keys_axis: int = 1):
    """Applies key validity and the band to the logits.

    `s` is `[block_q, block_k]` with `valid` int32 `[1, block_k]` (keys_axis=1),
    or transposed, `[block_k, block_q]` with `valid` `[block_k, 1]` (keys_axis=0).
    """
    allowed = valid != 0
    if left is not None or right is not None:
        rel = (k_first + lax.broadcasted_iota(jnp.int32, s.shape, keys_axis)) - (
            q_first + lax.broadcasted_iota(jnp.int32, s.shape, 1 - keys_axis)
        )
        if left is not None:
            allowed = allowed & (rel >= -left)
        if right is not None:
            allowed = allowed & (rel <= right)
    return jnp.where(allowed, s, MASK_VALUE)


def _online_update(m, l, acc, s, v, dots):
    """One visit of the online softmax: m, l `[block_q, 1]`, acc `[block_q, d]`, all float32.

    The normaliser l sums the float32 weights; p @ v takes them as `dots` operands.
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + dots(p, v, _NN)
    return m_new, l_new, acc_new


def _finalize(m, l, acc):
    """(out, natural lse `[block_q, 1]`); a row whose running max is still MASK_VALUE attended nothing."""
    has_key = m > MASK_VALUE / 2
    l_safe = jnp.where(has_key, l, 1.0)
    out = jnp.where(has_key, acc / l_safe, 0.0)
    lse = jnp.where(has_key, (m + jnp.log2(l_safe)) / LOG2E, MASK_VALUE)
    return out, lse


def _probs_and_dscores(s, lse2, row_term, do, v, dots):
    """p = exp2(s - lse2) and ds = p * (dp + row_term), with dp = do @ v.T; float32.

    Transposed (s `[block_k, block_q]`, lse2 and row_term `[1, block_q]`), pass
    (v, do) for (do, v): dp.T = v @ do.T.
    """
    p = jnp.exp2(s - lse2)
    ds = p * (dots(do, v, _NT) + row_term)
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
        qk_scale=config.scale * LOG2E, dots=_dots(config.backend, q.dtype),
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
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, dots,
):
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    # Cast once, not per visit: the loop-invariant tile also holds half the registers in bf16.
    q = dots.operand(q_ref[...])

    def visit(t, carry):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        s = _scores(q, k_ref[keys, :], qk_scale, dots)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: _masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        return _online_update(*carry, s, v_ref[keys, :], dots)

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
                  scale=config.scale, dots=_dots(config.backend, q.dtype))
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
    block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, dots,
):
    i = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, i, n_rows, per_head, entries)
    q, do = dots.operand(q_ref[...]), dots.operand(do_ref[...])
    lse2, row_term = lse_ref[...][:, None], rt_ref[...][:, None]

    def visit(t, dq):
        code = codes_ref[code_base + t]
        kb = code // 2
        keys = pl.ds(kb * block_k, block_k)
        k = dots.operand(k_ref[keys, :])  # feeds two dots
        s = _scores(q, k, qk_scale, dots)
        s = lax.cond(
            (code % 2 + flags_ref[kb]) > 0,
            lambda s: _masked(s, i * block_q, kb * block_k, valid_ref[keys][None, :], left, right),
            lambda s: s,
            s,
        )
        _, ds = _probs_and_dscores(s, lse2, row_term, do, v_ref[keys, :], dots)
        return dq + dots(ds, k, _NN)

    dq = lax.fori_loop(start, stop, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(
    offsets_ref, codes_ref, flags_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, rt_ref, dk_ref, dv_ref,
    *, block_q, block_k, n_rows, entries, per_head, left, right, qk_scale, scale, dots,
):
    # Scores transposed, `[block_k, block_q]` (as Triton's fused-attention backward): p.T and
    # ds.T come out as the left operands of dv += p.T @ do and dk += ds.T @ q, and q, do enter
    # as right operands, with no register transposes. At head_dim 128 with float32 inputs
    # (tiles loaded as float32, then cast) the untransposed form spilled ~190 B.
    j = pl.program_id(0)
    start, stop, code_base = _row_range(offsets_ref, j, n_rows, per_head, entries)
    k, v = dots.operand(k_ref[...]), dots.operand(v_ref[...])
    valid_col = valid_ref[pl.ds(j * block_k, block_k)][:, None]
    needs_valid = flags_ref[j]

    def visit(t, carry):
        dk, dv = carry
        code = codes_ref[code_base + t]
        qb = code // 2
        rows = pl.ds(qb * block_q, block_q)
        q, do = dots.operand(q_ref[rows, :]), dots.operand(do_ref[rows, :])  # each feeds two dots
        s_t = _scores(k, q, qk_scale, dots)
        s_t = lax.cond(
            (code % 2 + needs_valid) > 0,
            lambda s: _masked(s, qb * block_q, j * block_k, valid_col, left, right, keys_axis=0),
            lambda s: s,
            s_t,
        )
        p_t, ds_t = _probs_and_dscores(s_t, lse_ref[rows][None, :], rt_ref[rows][None, :], v, do, dots)
        dv = dv + dots(p_t, do, _NN)
        dk = dk + dots(ds_t, q, _NN)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(start, stop, visit, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- TPU (Mosaic) ----------------------------------------------------------------------------------


def _tpu_params():
    # Batch and heads split across cores; the visit axis carries the accumulators.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


@dataclasses.dataclass(frozen=True)
class _Walk:
    """How a TPU kernel reads its visit list (`block_layout.VisitTables`, scalar-prefetched into SMEM).

    The tables are (row_base, row_offset, codes), then the per-(batch, key
    block) validity flags: the four scalar-prefetch refs of every TPU kernel.
    """

    length: int  # visits per head: the grid's last axis
    per_head: bool  # one visit list per head (else one shared by all heads)
    total: int  # visits in the tables

    @classmethod
    def of(cls, tables: block_layout.VisitTables) -> _Walk:
        total = tables.codes.shape[0]
        return cls(length=tables.length, per_head=total > tables.length, total=total)

    def index(self, hi, e):
        return (hi * self.length if self.per_head else 0) + e

    def row(self, base_ref, offset_ref, i):
        chunk = lax.shift_right_logical(i, _ROW_CHUNK_BITS)
        return base_ref[chunk].astype(jnp.int32) + offset_ref[i].astype(jnp.int32)

    def col(self, codes_ref, i):
        return lax.shift_right_logical(codes_ref[i].astype(jnp.int32), block_layout.CODE_SHIFT)

    def maps(self, rows_are_q: bool):
        """Index maps of the q-side blocks, the k-side blocks and the key-validity row."""

        def q_block(bi, hi, e, base, offset, codes, kflags):
            i = self.index(hi, e)
            return bi, hi, (self.row(base, offset, i) if rows_are_q else self.col(codes, i)), 0

        def k_block(bi, hi, e, base, offset, codes, kflags):
            i = self.index(hi, e)
            return bi, hi, (self.col(codes, i) if rows_are_q else self.row(base, offset, i)), 0

        def valid_block(bi, hi, e, base, offset, codes, kflags):
            return (bi,) + k_block(bi, hi, e, base, offset, codes, kflags)[2:3] + (0, 0)

        return q_block, k_block, valid_block

    def position(self, base_ref, offset_ref, codes_ref):
        """(row, col, code, first, last) of the current grid step's visit.

        A visit is its row's first when the previous visit of its head has
        another row, its last when the next one has (the tables keep no flags).
        """
        e = pl.program_id(2)
        i = self.index(pl.program_id(1), e)
        row = self.row(base_ref, offset_ref, i)
        prev = self.row(base_ref, offset_ref, jnp.maximum(i - 1, 0))
        nxt = self.row(base_ref, offset_ref, jnp.minimum(i + 1, self.total - 1))
        first = jnp.logical_or(e == 0, prev != row)
        last = jnp.logical_or(e == self.length - 1, nxt != row)
        code = codes_ref[i].astype(jnp.int32)
        return row, lax.shift_right_logical(code, block_layout.CODE_SHIFT), code, first, last


_ROW_CHUNK_BITS = block_layout.ROW_CHUNK.bit_length() - 1
assert 1 << _ROW_CHUNK_BITS == block_layout.ROW_CHUNK


def _tpu_tables(layout: block_layout.BlockLayout, transposed: bool, valid, block_k: int):
    """(walk, the four scalar-prefetch operands) of a kernel walking `layout` (transposed: by key block)."""
    tables = layout.visit_tables(transposed)
    # 0/1 per (batch, key block): int8 in SMEM.
    kflags = _key_block_flags(valid, block_k).astype(jnp.int8).reshape(-1)
    return _Walk.of(tables), (*(jnp.asarray(a) for a in tables.arrays), kflags)


def _tpu_footprints(config: _Config, batch: int, head_dim: int, dtype) -> dict[str, tpu_footprint.Footprint]:
    """The SMEM and VMEM each TPU kernel of a call holds (its block specs, scratch and tables)."""
    out = {}
    dtype = jnp.dtype(dtype)
    f32, i32 = jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)
    for kind, layout, transposed in (("forward", config.forward_layout, False),
                                     ("dq", config.backward_layout, False), ("dkv", config.backward_layout, True)):
        bq, bk, d = layout.block_q, layout.block_k, head_dim
        smem = (*layout.visit_tables(transposed).arrays, ((batch * layout.num_k_blocks,), jnp.int8))
        q_blk, k_blk, valid_blk, col = ((bq, d), dtype), ((bk, d), dtype), ((1, bk), i32), ((bq, 1), f32)
        if kind == "forward":
            ins, outs, scratch = [q_blk, k_blk, k_blk, valid_blk], [q_blk, col], [((bq, 1), f32)] * 2 + [((bq, d), f32)]
        elif kind == "dq":
            ins, outs, scratch = [q_blk, k_blk, k_blk, valid_blk, q_blk, col, col], [q_blk], [((bq, d), f32)]
        else:
            ins, outs, scratch = [q_blk, k_blk, k_blk, valid_blk, q_blk, col, col], [k_blk, k_blk], [((bk, d), f32)] * 2
        out[kind] = tpu_footprint.footprint(
            f"block_sparse_flash_{'fwd' if kind == 'forward' else kind}",
            smem_arrays=smem, inputs=ins, outputs=outs, scratch=scratch,
        )
    return out


def tpu_footprints(pattern: Pattern, *, batch: int, head_dim: int, dtype, block_sizes: TpuBlockSizes | None = None,
                   scale: float = 1.0) -> dict[str, tpu_footprint.Footprint]:
    """SMEM and VMEM of the forward, dq and dk/dv TPU kernels of a call, from its layout; nothing runs.

    Args:
      pattern: the call's `Pattern` (kernel positions).
      batch: the kernel's batch (for a dilated band, batch x dilation).
      head_dim, dtype: of q, k and v.
      block_sizes: `TpuBlockSizes`; None: the defaults.

    Returns:
      {'forward' | 'dq' | 'dkv': `tpu_footprint.Footprint`}.
    """
    block_sizes = TpuBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, TpuBlockSizes):
        raise ValueError(f"block_sizes must be a TpuBlockSizes or None, got {block_sizes!r}")
    config = _make_config(pattern, block_sizes, interpret=False, scale=scale)
    return _tpu_footprints(config, batch, head_dim, dtype)


def _check_tpu_footprint(config: _Config, kind: str, batch: int, head_dim: int, dtype) -> None:
    # Before lowering: an SMEM overflow would otherwise surface only on the chip, VMEM as a compile error.
    fp = _tpu_footprints(config, batch, head_dim, dtype)[kind]
    layout = config.forward_layout if kind == "forward" else config.backward_layout
    tpu_footprint.check(
        fp, f"a call with {layout.num_q_blocks} query blocks of {layout.block_q}, {layout.layout_heads} layout "
        f"head(s) and {layout.total_entries():,} visits, batch {batch}, head_dim {head_dim},",
    )


def _tpu_forward(q, k, v, valid, config):
    layout = config.forward_layout
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [batch, heads, seq, d]
    b, h, n, d = qt.shape
    bq, bk = layout.block_q, layout.block_k
    _check_tpu_footprint(config, "forward", b, d, q.dtype)
    walk, prefetch = _tpu_tables(layout, False, valid, bk)
    q_map, k_map, valid_map = walk.maps(rows_are_q=True)
    kernel = functools.partial(
        _tpu_forward_kernel, block_q=bq, block_k=bk, num_k_blocks=layout.num_k_blocks, walk=walk,
        left=layout.left, right=layout.right, qk_scale=config.scale * LOG2E, dots=_dots(config.backend, q.dtype),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, h, walk.length),
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
    )(*prefetch, qt, kt, vt, _valid_blocks(valid, bk))
    return jnp.swapaxes(out, 1, 2), lse[..., 0]


def _valid_blocks(valid, block_k):
    """int32 `[batch, key_blocks, 1, block_k]`: per key block a row vector, a legal Mosaic block."""
    b, n = valid.shape
    return valid.astype(jnp.int32).reshape(b, n // block_k, 1, block_k)


def _visit(code, kflags_ref, kb, num_k_blocks, when_masked, when_full):
    """Runs the visit's body, masked if its block is partial or holds an invalid key."""
    key_flag = kflags_ref[pl.program_id(0) * num_k_blocks + kb].astype(jnp.int32)
    needs_mask = ((code & block_layout.CODE_PARTIAL) + key_flag) > 0
    compute = (code & block_layout.CODE_COMPUTE) != 0
    pl.when(compute & needs_mask)(when_masked)
    pl.when(compute & jnp.logical_not(needs_mask))(when_full)


def _tpu_forward_kernel(
    base_ref, offset_ref, codes_ref, kflags_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref,
    m_ref, l_ref, acc_ref, *, block_q, block_k, num_k_blocks, walk, left, right, qk_scale, dots,
):
    qb, kb, code, first, last = walk.position(base_ref, offset_ref, codes_ref)

    @pl.when(first)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        def body():
            s = _scores(q_ref[...], k_ref[...], qk_scale, dots)
            if masked:
                s = _masked(s, qb * block_q, kb * block_k, valid_ref[...], left, right)
            m, l, acc = _online_update(m_ref[...], l_ref[...], acc_ref[...], s, v_ref[...], dots)
            m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

        return body

    _visit(code, kflags_ref, kb, num_k_blocks, update(True), update(False))

    @pl.when(last)
    def _write():
        out, lse = _finalize(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_backward(q, k, v, valid, do, lse2, row_term, config):
    layout = config.backward_layout
    qt, kt, vt, dot_ = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
    b, h, _, d = qt.shape
    bq, bk = layout.block_q, layout.block_k
    valid_blocks = _valid_blocks(valid, bk)
    lse2, row_term = lse2[..., None], row_term[..., None]  # [batch, heads, seq, 1]: column blocks
    static = dict(block_q=bq, block_k=bk, num_k_blocks=layout.num_k_blocks, left=layout.left, right=layout.right,
                  qk_scale=config.scale * LOG2E, scale=config.scale, dots=_dots(config.backend, q.dtype))
    outputs = []
    for kind, transposed in (("dq", False), ("dkv", True)):
        _check_tpu_footprint(config, kind, b, d, q.dtype)
        walk, prefetch = _tpu_tables(layout, transposed, valid, bk)
        q_map, k_map, valid_map = walk.maps(rows_are_q=not transposed)
        q_spec, k_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), k_map)
        col_spec = pl.BlockSpec((None, None, bq, 1), q_map)
        if kind == "dq":
            kernel, out_specs = _tpu_dq_kernel, q_spec
            out_shape, scratch = jax.ShapeDtypeStruct(qt.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)]
        else:
            kernel, out_specs = _tpu_dkv_kernel, [k_spec, k_spec]
            out_shape = [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)]
            scratch = [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]
        result = pl.pallas_call(
            functools.partial(kernel, walk=walk, **static),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=4,
                grid=(b, h, walk.length),
                in_specs=[q_spec, k_spec, k_spec, pl.BlockSpec((None, None, 1, bk), valid_map), q_spec, col_spec,
                          col_spec],
                out_specs=out_specs,
                scratch_shapes=scratch,
            ),
            out_shape=out_shape,
            compiler_params=_tpu_params(),
            interpret=config.interpret,
            name=f"block_sparse_flash_{kind}",
        )(*prefetch, qt, kt, vt, valid_blocks, dot_, lse2, row_term)
        outputs.extend([result] if kind == "dq" else result)
    return tuple(jnp.swapaxes(x, 1, 2) for x in outputs)


def _tpu_dq_kernel(
    base_ref, offset_ref, codes_ref, kflags_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, rt_ref, dq_ref,
    acc_ref, *, block_q, block_k, num_k_blocks, walk, left, right, qk_scale, scale, dots,
):
    qb, kb, code, first, last = walk.position(base_ref, offset_ref, codes_ref)

    @pl.when(first)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        def body():
            k = k_ref[...]
            s = _scores(q_ref[...], k, qk_scale, dots)
            if masked:
                s = _masked(s, qb * block_q, kb * block_k, valid_ref[...], left, right)
            _, ds = _probs_and_dscores(s, lse_ref[...], rt_ref[...], do_ref[...], v_ref[...], dots)
            acc_ref[...] += dots(ds, k, _NN)

        return body

    _visit(code, kflags_ref, kb, num_k_blocks, update(True), update(False))

    @pl.when(last)
    def _write():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(
    base_ref, offset_ref, codes_ref, kflags_ref, q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, rt_ref,
    dk_ref, dv_ref, dk_acc, dv_acc, *, block_q, block_k, num_k_blocks, walk, left, right, qk_scale, scale, dots,
):
    kb, qb, code, first, last = walk.position(base_ref, offset_ref, codes_ref)

    @pl.when(first)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(masked: bool):
        def body():
            q, do = q_ref[...], do_ref[...]
            s = _scores(q, k_ref[...], qk_scale, dots)
            if masked:
                s = _masked(s, qb * block_q, kb * block_k, valid_ref[...], left, right)
            p, ds = _probs_and_dscores(s, lse_ref[...], rt_ref[...], do, v_ref[...], dots)
            dv_acc[...] += dots(p, do, _TN)
            dk_acc[...] += dots(ds, q, _TN)

        return body

    _visit(code, kflags_ref, kb, num_k_blocks, update(True), update(False))

    @pl.when(last)
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
