"""Block-sparse flash attention in Pallas: forward, dq and dk/dv kernels for GPU and TPU.

Each query block visits the key blocks its `BlockLayout` lists: an online
softmax with float32 running max and sum in base 2 (`exp2` of scores scaled by
`scale * log2(e)`), float32 accumulation, and outputs `out` and the per-row
log-sum-exp (natural log), so partial results merge exactly. A visit is full
(no masking work) or partial (the band mask computed in-kernel from the
layout's band and, where a layout's blocks span several sub-blocks such as
BigBird slots on TPU, a per-visit bitmask of the sub-block pairs it attends);
a per-token key-validity vector (padding, keys attended
elsewhere, the padded tail) is applied only to key blocks that hold an invalid
key, which a per-(batch, key block) flag says. No dense mask is passed in.

The backward pass is a `jax.custom_vjp` with two kernels, flash-attention-2
style: dq walks the layout by query block, dk/dv walks the transposed layout
(the query blocks that see each key block), so neither needs atomics. It
accepts a cotangent for the log-sum-exp: `ds = p * (dp + d_lse - rowsum(do * o))`.

Two lowerings of the same math (`block_sparse_visit`), one module each:
* GPU (Triton, `block_sparse_gpu`): one program per (query block, batch,
  head) loops over its layout row. Float32 inputs run their matmuls with
  bfloat16 operands and float32 accumulation (tensor cores, as FlashAttention).
* TPU (Mosaic, `block_sparse_tpu`): the grid walks a flattened list of visits
  per head, scalar-prefetched into SMEM, so only visited blocks are DMA'd.
  Float32 inputs keep float32 matmuls (`Precision.HIGHEST`).
This module holds what they share: block sizes, the public wrapper, the
static configuration and the `custom_vjp`.

What to attend comes as a `Pattern` (its kernel length and its
`BlockLayout`s), built above this module by `longjax.attention.kernel_layouts`.
`block_sizes` is a `GpuBlockSizes` or `TpuBlockSizes`; its type selects the
lowering, so a CPU host can export either; None lets the lowered platform
choose its defaults (`per_lowering`). The GPU block lengths left None are
chosen per pattern, head width and dtype by the cost model of
`block_sparse_tuning`. Every kernel takes `interpret=`.

An optional banded score bias (`bias=`, float32 `[batch, seq, heads, left +
right + 1]` for a band pattern) is added to q.k before scaling: query i and key
j get column `left - i + j` of row i, so a per-offset term (Transformer-XL's
relative positions, `queries_i . r_{i-j}` computed per offset above the
kernels) enters without a `seq x seq` array. A pattern whose keys reach any
offset (BigBird's random blocks) takes a per-visit bias instead: its
`visit_bias_columns` place each visit's keys at consecutive columns of a
`[batch, seq, heads, visit_bias_width]` bias. Its gradient comes back through
the `custom_vjp`. A bias given as a `ComputedBias` (a function of smaller
arrays, as relative positions' queries and embeddings) is recomputed in the
backward pass rather than saved, so a model keeps those arrays between its
passes, not the float32 bias. The Triton kernels gather the bias tiles with
integer-array loads; the Mosaic ones, which have no gather, cut each tile out
of the query block's rows with a lane rotation (`block_sparse_tpu`): strided
for the banded bias (the relative shift), plain to a visit's first column for
the per-visit one (a rotation per slot pair where a block spans several).

Layout at this module's boundary: `[batch, seq, heads, head_dim]`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from kernels_pallas import block_layout, block_sparse_gpu, block_sparse_tpu, block_sparse_tuning, common
from kernels_pallas import tpu_footprint
from kernels_pallas.block_sparse_visit import LOG2E, dots_for
from kernels_pallas.common import MASK_VALUE

_TRITON_MIN_DOT = block_sparse_gpu.TRITON_MIN_DOT
# Widest head tile the Triton kernels take, as FlashAttention's GPU kernels.
_GPU_MAX_HEAD_DIM = 256
_BLOCK_NAMES = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")


def _is_power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Block lengths of the Triton lowering; powers of two, or None to have them chosen per call.

    A length left None (the default) is chosen for the call's pattern, head
    width and dtype by `block_sparse_tuning.choose_gpu_blocks`: the cheapest
    power of two from 16 to 128 (query) or 64 (key, and backward) under its
    cost model of computed scores, tile loads and per-visit and per-program
    overheads. A narrow band gets small blocks, which compute few masked-out
    scores; a wide one gets FlashAttention-sized blocks. Given lengths are
    used as they are (fitted to the pattern: never longer than its sequence
    or, for BigBird, its slot). `call_block_sizes` says what a call uses.

    Matmuls: float32 inputs run on the tensor cores with bfloat16 operands and
    float32 accumulation, as FlashAttention does: the kernels cast q, k, v,
    do and the probabilities p and score gradients ds to bfloat16 explicitly
    before each dot (in interpret mode too, so CPU tests see the GPU's
    rounding), while the softmax statistics, accumulators and outputs stay
    float32. Expect errors of a few bfloat16 roundings (2^-8 relative) against
    a float32 evaluation. bfloat16 and float16 inputs are used as they are.

    Attributes:
      block_q, block_k: query and key block of the forward kernel; None: chosen.
      block_q_bwd, block_k_bwd: query and key block of the dq and dk/dv kernels; None: chosen.
      num_warps: warps per program; None: 4 up to a head tile of 64, else 8.
      num_stages: software-pipelining stages of the key loop.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in _BLOCK_NAMES:
            value = getattr(self, name)
            if value is not None and not _is_power_of_two(value):
                raise ValueError(f"GpuBlockSizes.{name} must be None or a power of two, got {value!r}")
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

    A grid step moves one (query block, key block) pair into VMEM and computes
    the key block in sub-blocks of `block_k_compute` keys (splash attention's
    `block_kv` / `block_kv_compute`): long key blocks amortise the per-step
    overhead, while each product stays MXU-sized, and sub-blocks the pattern
    leaves out are skipped.

    Attributes:
      block_q, block_k: query and key block of the forward kernel.
      block_q_bwd, block_k_bwd: query and key block of the dq and dk/dv kernels.
      block_k_compute: keys computed at once inside a key block, a multiple of 8
        dividing block_k and block_k_bwd; None: 128 where the key block is a
        multiple of 128, else the whole block (`block_sparse_tpu.key_compute_block`).
        Where fitting shortens the key blocks (a sequence, or a BigBird tile,
        shorter than them), it shortens with them, to at most the shorter key
        block; one that then divides neither raises ValueError naming it.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128
    block_k_compute: int | None = None

    def __post_init__(self):
        for name in _BLOCK_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % tpu_footprint.NUM_SUBLANES:
                raise ValueError(f"TpuBlockSizes.{name} must be a positive multiple of 8, got {value!r}")
        compute = self.block_k_compute
        if compute is not None and (
            not isinstance(compute, int) or isinstance(compute, bool) or compute < 1 or compute % tpu_footprint.NUM_SUBLANES
            or self.block_k % compute or self.block_k_bwd % compute
        ):
            raise ValueError(
                "TpuBlockSizes.block_k_compute must be None or a positive multiple of 8 dividing block_k "
                f"({self.block_k}) and block_k_bwd ({self.block_k_bwd}), got {compute!r}"
            )


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
        return common.round_up(length, tpu_footprint.NUM_SUBLANES)
    if interpret:
        return common.next_power_of_two(length)
    return max(_TRITON_MIN_DOT, common.next_power_of_two(length))


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

    # A pattern that takes a per-visit score bias (see `block_sparse_flash`'s `bias`) also has
    # `visit_bias_width: int` and `visit_bias_columns(layout) -> (columns, t_columns)`: int NumPy
    # tables shaped as the layout's `codes` and `t_codes`, each visit's first bias column (layouts
    # within a slot, the Triton kernels'); and `slot: int` and `visit_bias_key_slots()`, int
    # `[heads, slots, entries]`, the key slot whose keys each entry of a query slot's bias holds at
    # columns `entry * slot ..` (the Mosaic kernels', whose blocks may span slots).


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
    # TPU: keys computed at once in a key block, forward and backward (None: the lowering's rule).
    block_k_compute: int | None = None

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


class ComputedBias(NamedTuple):
    """A score bias computed from arrays: `fn(*args)`, float32 (see `block_sparse_flash`'s `bias`).

    The call computes it in the forward pass and again in the backward pass,
    where `jax.vjp(fn, *args)` takes the bias's gradient to the arguments': only
    `args` are saved between the passes. `fn` must be a function of `args`
    alone (static settings bound, e.g. with `functools.partial`), no traced
    values closed over.
    """

    fn: Callable
    args: tuple


def block_sparse_flash(q, k, v, key_valid, *, pattern, scale: float, bias=None, block_sizes=None, interpret=None):
    """Block-sparse flash attention over a band or BigBird pattern.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one shape and dtype; `seq` is
        the pattern's kernel length (`seq_len` for a band; `num_blocks * slot`
        for BigBird, whose tokens the caller has placed in slots).
      key_valid: bool `[batch, seq]`; keys that are False are never attended.
      pattern: a `Pattern`, e.g. `longjax.attention.kernel_layouts.BandPattern`
        or `BigBirdPattern`.
      scale: score multiplier.
      bias: None, a `ComputedBias` computing one (recomputed in the backward pass, not
        saved), or the bias itself (saved for the backward pass): a banded score bias, float32 `[batch, seq, heads, left + right + 1]`
        for a band pattern of sides (left, right): the score of query i and key j
        becomes `scale * (q_i . k_j + bias[i, left - i + j])`; for a pattern with
        `visit_bias_columns` (BigBird's), a per-visit bias, float32 `[batch, seq,
        heads, pattern.visit_bias_width]`, the score of query i and key j of a
        visit whose keys start at `k0` and whose column entry is c0 gaining
        `bias[i, c0 + j - k0]` (per slot pair of a visit whose blocks span
        several slots, the pair's entry from `visit_bias_key_slots`). Differentiable.
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
    if bias is not None and not isinstance(bias, ComputedBias):
        bias = ComputedBias(_given, (bias,))
    bias_fn, bias_args = (None, ()) if bias is None else (bias.fn, tuple(bias.args))
    return per_lowering(
        functools.partial(_block_sparse_flash, pattern=pattern, scale=scale, interpret=interpret, bias_fn=bias_fn),
        q, k, v, key_valid, *bias_args, block_sizes=block_sizes, interpret=interpret,
    )


def _given(bias):
    """The bias of a call given it as an array: itself (so the array is what the backward pass keeps)."""
    return bias


def _padded_bias(fn, pad: int, *args):
    """`fn(*args)` padded along seq by `pad` positions (zeros), as the kernels' inputs."""
    return jnp.pad(fn(*args), ((0, 0), (0, pad), (0, 0), (0, 0)))


def _check_bias(bias, config: _Config, q) -> None:
    layouts = (config.forward_layout, config.backward_layout)
    per_visit = getattr(config.pattern, "visit_bias_columns", None) is not None
    if per_visit:
        # GPU layouts have no sub-blocks (`block_sparse_gpu` refuses them); the TPU kernels read a
        # run of columns per slot pair (`visit_bias_key_slots`).
        width, expected = config.pattern.visit_bias_width, "pattern.visit_bias_width"
    elif any(layout.left is None or layout.right is None or layout.sub_block is not None for layout in layouts):
        raise NotImplementedError(
            f"a score bias needs a band pattern (one band, no sub-blocks) or a pattern with visit_bias_columns, "
            f"got {type(config.pattern).__name__}"
        )
    else:
        width, expected = layouts[0].left + layouts[0].right + 1, "left + right + 1"
    shape = q.shape[:3] + (width,)
    if bias.shape != shape or bias.dtype != jnp.float32:
        raise ValueError(
            f"bias must be float32 [batch, seq, heads, {expected}] = {shape}, got {bias.shape} {bias.dtype}"
        )


def _block_sparse_flash(block_sizes, q, k, v, key_valid, *bias_args, pattern, scale, interpret, bias_fn=None):
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
    if isinstance(block_sizes, GpuBlockSizes) and not interpret:
        width = block_sparse_gpu.kernel_head_dim(head_dim, interpret)
        if width > _GPU_MAX_HEAD_DIM:
            # Each program keeps [block, width] tiles in registers and shared memory;
            # wider heads (e.g. 64 + Transformer-XL's d_model position features) do not
            # fit at these block sizes, and a Triton compile error would not fall back.
            raise NotImplementedError(
                f"the Triton kernels take head_dim up to {_GPU_MAX_HEAD_DIM}, got {head_dim} "
                f"(tiles {width} wide); impl='xla' serves it"
            )
    config = _make_config(pattern, block_sizes, interpret, scale, head_dim, q.dtype)
    if bias_fn is not None:
        _check_bias(jax.eval_shape(bias_fn, *bias_args), config, q)
    padded = config.padded_len
    # Whole blocks in seq only: the Triton kernels mask the head to its power-of-two tile width
    # in-kernel, and Mosaic takes full-width head blocks.
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
    valid = jnp.pad(key_valid, ((0, 0), (0, padded - seq)))
    bias_fn = None if bias_fn is None else functools.partial(_padded_bias, bias_fn, padded - seq)
    out, lse = _flash(pad(q), pad(k), pad(v), valid, bias_args, config, bias_fn)
    return out[:, :seq], lse[:, :, :seq]


@functools.lru_cache(maxsize=256)
def _fitted_blocks(pattern, block_sizes: BlockSizes, interpret: bool, head_dim: int, dtype) -> dict[str, int]:
    """The block lengths of a call: given ones fitted to the pattern, GPU ones left None chosen
    (and, for a TPU call that asks for one, its fitted `block_k_compute`).

    Cached: the choice builds a layout per candidate (~2 s for BigBird at 128K tokens and 16 heads),
    and every trace of the same call asks again. The result is shared: do not modify it.
    """
    fit = lambda name, length: pattern.fit(length, block_sizes, interpret, name)
    requested = {name: getattr(block_sizes, name) for name in _BLOCK_NAMES}
    if any(length is None for length in requested.values()):
        return block_sparse_tuning.choose_gpu_blocks(
            pattern, fit, width=block_sparse_gpu.kernel_head_dim(head_dim, interpret),
            itemsize=jnp.dtype(dtype).itemsize, requested=requested,
        )
    fitted = {name: fit(name, length) for name, length in requested.items()}
    compute = getattr(block_sizes, "block_k_compute", None)
    if compute is not None:
        fitted["block_k_compute"] = _fitted_compute(compute, fitted["block_k"], fitted["block_k_bwd"])
    return fitted


def _fitted_compute(requested: int, block_k: int, block_k_bwd: int) -> int:
    """A requested compute block for the fitted key blocks: at most the shorter, dividing both."""
    compute = min(requested, block_k, block_k_bwd)
    if block_k % compute or block_k_bwd % compute:
        raise ValueError(
            f"TpuBlockSizes.block_k_compute={requested} does not fit the key blocks this pattern takes "
            f"(block_k {block_k}, block_k_bwd {block_k_bwd}): pass a divisor of both, or None"
        )
    return compute


def call_block_sizes(pattern: Pattern, block_sizes: BlockSizes, *, head_dim: int, dtype,
                     interpret: bool = False) -> BlockSizes:
    """The block sizes a call with these arguments runs: every length filled in and fitted to the pattern.

    Nothing runs; for GPU lengths left None this is the cost model's choice
    (`block_sparse_tuning`). Passing the result back gives the same kernels.
    """
    if check_block_sizes(block_sizes) is None:
        raise ValueError("block_sizes must be a GpuBlockSizes or TpuBlockSizes: it names the lowering, got None")
    return dataclasses.replace(
        block_sizes, **_fitted_blocks(pattern, block_sizes, interpret, head_dim, jnp.dtype(dtype))
    )


def _make_config(pattern, block_sizes: BlockSizes, interpret: bool, scale: float, head_dim: int, dtype) -> _Config:
    """The static configuration of a call: the pattern's fitted blocks for the lowering of `block_sizes`."""
    is_gpu = isinstance(block_sizes, GpuBlockSizes)
    fitted = _fitted_blocks(pattern, block_sizes, interpret, head_dim, jnp.dtype(dtype))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, valid, bias_args, config: _Config, bias_fn):
    """(out, lse); with `bias_fn`, the score bias `bias_fn(*bias_args)` (padded), recomputed backward."""
    return _forward(q, k, v, valid, None if bias_fn is None else bias_fn(*bias_args), config)


def _flash_fwd(q, k, v, valid, bias_args, config, bias_fn):
    out, lse = _forward(q, k, v, valid, None if bias_fn is None else bias_fn(*bias_args), config)
    return (out, lse), (q, k, v, valid, bias_args, out, lse)


def _flash_bwd(config, bias_fn, residuals, cotangents):
    q, k, v, valid, bias_args, out, lse = residuals
    d_out, d_lse = cotangents
    # Per-row terms in [batch, heads, seq]; rows that attended nothing get lse = +1e30,
    # so every p = exp2(s - lse) of theirs is 0.
    row_term, lse = common.backward_row_terms(
        jnp.swapaxes(out, 1, 2).astype(jnp.float32), lse, jnp.swapaxes(d_out, 1, 2), d_lse
    )
    lse2 = jnp.where(lse < -MASK_VALUE / 2, lse * LOG2E, -MASK_VALUE)
    lowering, do = _LOWERINGS[config.backend], d_out.astype(q.dtype)
    if bias_fn is None:
        dq, dk, dv = lowering.backward(q, k, v, valid, do, lse2, row_term, config)
        return dq, dk, dv, None, ()
    bias, bias_vjp = jax.vjp(bias_fn, *bias_args)
    dq, dk, dv, d_bias = lowering.backward(q, k, v, valid, do, lse2, row_term, config, bias=bias)
    return dq, dk, dv, None, bias_vjp(d_bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


# The lowerings by `_Config.backend`: a module with `forward(q, k, v, valid, config) -> (out, lse)` and
# `backward(q, k, v, valid, do, lse2, row_term, config) -> (dq, dk, dv)`; one that takes a score bias
# (`block_sparse_gpu`) also takes `bias=` in both, its backward then adding d_bias to the tuple. A new
# GPU lowering (Mosaic GPU) joins here with its own block-size class, leaving the others untouched.
_LOWERINGS = {"gpu": block_sparse_gpu, "tpu": block_sparse_tpu}


def _forward(q, k, v, valid, bias, config):
    if bias is None:
        return _LOWERINGS[config.backend].forward(q, k, v, valid, config)
    return _LOWERINGS[config.backend].forward(q, k, v, valid, config, bias=bias)


def dot_operand_dtype(block_sizes: BlockSizes, dtype) -> jnp.dtype:
    """The dtype the lowering that `block_sizes` selects casts matmul operands to, for inputs of `dtype`.

    bfloat16 for float32 inputs of the Triton lowering, else the inputs' dtype
    (see `GpuBlockSizes`); accumulation is float32 in every case.
    """
    if check_block_sizes(block_sizes) is None:
        raise ValueError("block_sizes must be a GpuBlockSizes or TpuBlockSizes: it names the lowering, got None")
    backend = "gpu" if isinstance(block_sizes, GpuBlockSizes) else "tpu"
    return dots_for(backend, dtype).dtype


def tpu_footprints(pattern: Pattern, *, batch: int, head_dim: int, dtype, block_sizes: TpuBlockSizes | None = None,
                   scale: float = 1.0, bias_width: int | None = None) -> dict[str, tpu_footprint.Footprint]:
    """SMEM and VMEM of the forward, dq and dk/dv TPU kernels of a call, from its layout; nothing runs.

    Args:
      pattern: the call's `Pattern` (kernel positions).
      batch: the kernel's batch (for a dilated band, batch x dilation).
      head_dim, dtype: of q, k and v.
      block_sizes: `TpuBlockSizes`; None: the defaults.
      bias_width: with a banded score bias, its columns (`left + right + 1`); None without one.

    Returns:
      {'forward' | 'dq' | 'dkv': `tpu_footprint.Footprint`}.
    """
    block_sizes = TpuBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, TpuBlockSizes):
        raise ValueError(f"block_sizes must be a TpuBlockSizes or None, got {block_sizes!r}")
    config = _make_config(pattern, block_sizes, interpret=False, scale=scale, head_dim=head_dim, dtype=dtype)
    return block_sparse_tpu.footprints(config, batch, head_dim, dtype, bias_width)
