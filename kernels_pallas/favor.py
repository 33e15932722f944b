"""Pallas FAVOR+ (Performer) attention: causal chunked and bidirectional, forward and backward.

The numerical contract is `longjax.attention.favor`'s, term for term: the
same softmax features with the causal running-max key stabiliser and the
query stabiliser (or the ReLU map), padding excluded from numerator and
denominator, float32 states, stabilisers (and the usable-feature selection)
held constant in the gradient. Features are computed inside the kernels from
q, k and the projection, so no `[seq, features]` array reaches memory.

Passes (each a `favor_passes` pass: one program per (batch, head, chunk), all
parallel; what links the chunks is a scan over per-chunk states between passes,
as flash-linear-attention does it):

* causal forward: (1) each chunk's own state `S_c = sum_j phi(k_j) v_j^T`
  `[features, head_dim]`, normaliser `z_c` and key maximum `mu_c`, the
  features stabilised by `mu_c`; (2) in XLA, the state entering each chunk
  by a prefix scan over the chunks, `E_(c+1) = exp(P_c - P_(c+1)) E_c +
  exp(mu_c - P_(c+1)) S_c` with `P` the running key maximum (every factor
  <= 1; chunk c reads only chunks before it, so nothing later leaks in);
  (3) each chunk's output from its entering state and the exact masked
  product of its own query and key features, with each key stabilised by its
  running maximum, as in the XLA implementation; (1) also gives each key's
  largest logit, from which (3) finds the running maxima without a loop over
  the features.
* causal backward: (1)-(2) again, (1) also giving each key's largest logit;
  (3) per chunk, the forward recomputed for the per-row terms only: the
  query stabiliser `c_i`, `1 / den_i` and `g_i . out_i` (`[seq, 1]` each);
  (4) per chunk, dq and what the chunk's rows saw of its entering state (the
  local cotangent `seen^T a`); (5) in XLA, a reverse scan of those gives the
  cotangent of the state leaving each chunk (factors <= 1); (6) per chunk,
  dk and dv. (3) is a pass of its own so that (4) and (6) are one loop over
  the feature tiles each: done in one pass, the recomputation and the
  gradients spilled registers on an H100. No earlier state is recovered by
  subtraction.
* bidirectional forward: per-chunk partial sums of `phi(K)^T V`, the
  normaliser and the key maximum, combined in XLA (rescaled to the overall
  maximum); then a pass applies `phi(Q)` to them.
* bidirectional backward: per query chunk, dq and partial sums of
  `dKV = sum_i phi(q_i) a_i^T` and dz, summed in XLA; per key chunk, dk, dv.

The per-chunk states cost `chunks * features * head_dim` float32 per (batch,
head) in memory, `features * head_dim / chunk` per token: a longer chunk
makes them smaller and the in-chunk products larger.

The kernels take the projection scaled by `sqrt(scale)` and, on GPU, q, k
and v in float32 (see `favor_steps._Rows.x`); the scaling's gradient is XLA's.

The projection's gradient is computed (inside the same passes, as per-chunk partial sums) only when the
projection is being differentiated.

The matmuls take float32 operands (TF32 on NVIDIA tensor cores), accumulating
in float32. bfloat16 operands for the feature products (features against
states, features and the in-chunk scores; the projection kept in float32) were
measured against `favor_xla` in interpret mode (causal, seq 256, 2 heads,
head_dim 64, 64 features, chunk 32, seeded `battery.random_inputs`; each
kernel matmul's operands rounded to bfloat16 by wrapping `favor_steps._dot`): with
bfloat16 inputs dq and dk came out at 1.6x and 3.7x the bfloat16 tolerance of
`tests/attention/battery.py` (float32 operands: at most 0.13x), with float32
inputs 190-3500x the float32 one (float32 operands: at most 0.19x). Tiling
the features does not help there: each product is rounded the same whatever
the tile, so the operands stay float32.

GPU runs through Triton, TPU through Mosaic; the block-size dataclass
(`GpuBlockSizes` or `TpuBlockSizes`) selects the lowering, and without one
the platform chooses at lowering time.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas import favor_passes as passes
from kernels_pallas import favor_steps as steps
from kernels_pallas.common import MASK_VALUE

# Widest (padded) head the Triton kernels take: each program holds float32
# [features, head_dim] operands (the projection and a state) whole.
_GPU_MAX_HEAD_DIM = 128


def _check_chunks(blocks) -> None:
    for name in ("causal_chunk", "bidirectional_chunk"):
        value = getattr(blocks, name)
        if not common.is_int(value) or value < 1:
            raise ValueError(f"{type(blocks).__name__}.{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Chunk lengths and launch parameters of the Triton lowering.

    Attributes:
      causal_chunk: rows per program of the causal passes (forward and backward):
        the side of the exact in-chunk `[chunk, chunk]` product.
      bidirectional_chunk: rows per program of the bidirectional passes.
      feature_tile: features per step of the kernels' loop over the features:
        a program holds `[feature_tile, head_dim]` of the projection and of a
        state at a time, which is what keeps it within shared memory and
        registers (features beyond the padded count are not walked).
      num_warps: warps per program (every program is one chunk of one
        (batch, head)).
      num_stages: Triton's software-pipelining stages.

    Compiled, chunks must be powers of two >= 16 (Triton tiles are powers of
    two, `tl.dot` at least 16 on each side); interpret mode takes any chunk.
    """

    # Measured with experiments/kernel_resources.py (sm_90, 256 features, bf16
    # and f32, head_dim 64 and 128): with 32 rows, 16-feature tiles and 8 warps
    # no kernel spills and none needs more than 82 KB of shared memory; the
    # causal kernels at head_dim 128 use 253-255 registers. 32-feature tiles
    # spill up to 0.4 KB in the causal dq pass at head_dim 128 (Triton holds
    # a transposed `[head_dim, tile]` matmul operand whole in every warp), 4
    # warps up to 0.9 KB, 64-row chunks (Hopper's warp-group matmuls) several KB.
    causal_chunk: int = 32
    bidirectional_chunk: int = 32
    feature_tile: int = 16
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        _check_chunks(self)
        tile = self.feature_tile
        # The Triton kernels pad the features to a power of two, which such a tile divides.
        if not common.is_int(tile) or tile < 16 or tile & (tile - 1):
            raise ValueError(f"GpuBlockSizes.feature_tile must be a power of two >= 16, got {tile!r}")
        warps = self.num_warps
        if not common.is_int(warps) or not 1 <= warps <= 32 or warps & (warps - 1):
            raise ValueError(f"GpuBlockSizes.num_warps must be a power of two <= 32, got {self.num_warps!r}")
        if not common.is_int(self.num_stages) or self.num_stages < 1:
            raise ValueError(f"GpuBlockSizes.num_stages must be an int >= 1, got {self.num_stages!r}")

    def check_compiled(self) -> None:
        for name in ("causal_chunk", "bidirectional_chunk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(
                    f"GpuBlockSizes.{name} must be a power of two >= 16 for the compiled Triton kernels, "
                    f"got {value}"
                )


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Chunk lengths of the Mosaic lowering.

    Attributes:
      causal_chunk: rows per program of the causal passes (forward and backward).
      bidirectional_chunk: rows per step of the bidirectional passes.

    Compiled, chunks must be multiples of 16 (whole bfloat16 sublane tiles);
    multiples of 128 also fill the lanes of the `[chunk, chunk]` products and
    the MXU. Interpret mode takes any chunk.
    """

    causal_chunk: int = 128
    bidirectional_chunk: int = 256

    def __post_init__(self):
        _check_chunks(self)

    def check_compiled(self) -> None:
        for name in ("causal_chunk", "bidirectional_chunk"):
            value = getattr(self, name)
            if value % 16:
                raise ValueError(
                    f"TpuBlockSizes.{name} must be a multiple of 16 for the compiled Mosaic kernels, got {value}"
                )


BlockSizes = GpuBlockSizes | TpuBlockSizes


def _backend_of(blocks) -> str:
    return "gpu" if isinstance(blocks, GpuBlockSizes) else "tpu"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """A Python value carried through custom_vjp residuals as pytree structure."""

    value: bool


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call, shared by its passes.

    `features` is the number of real features; arrays may carry more (padding
    for the backend's tiles), which the kernels mask to zero.
    """

    feature_map: str
    causal: bool
    scale: float
    features: int
    compute_dtype: str
    out_dtype: str
    backend: str
    interpret: bool
    chunk: int
    feature_tile: int
    num_warps: int | None
    num_stages: int | None

    def launch(self, name: str) -> passes.Launch:
        return passes.Launch(
            backend=self.backend, chunk=self.chunk, interpret=self.interpret,
            num_warps=self.num_warps, num_stages=self.num_stages, name=name,
        )


def favor_attention_pallas(
    q,
    k,
    v,
    *,
    projection,
    feature_map: str = "softmax",
    causal: bool = False,
    padding_mask=None,
    scale=None,
    chunk_size: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
):
    """FAVOR+ attention through the Pallas kernels.

    The arguments are taken as valid: `longjax.attention.favor_attention`
    checks them before it dispatches here (through `longjax.attention.pallas_favor`).
    What is checked here is what the kernels themselves impose: chunk lengths
    the compiled lowerings take, and the widest head of the Triton kernels.

    Args:
      q, k, v: `[batch, seq, heads, head_dim]`, one shape and floating dtype.
      projection: floating `[features, head_dim]` (shared by heads) or
        `[heads, features, head_dim]`.
      feature_map: 'softmax' (positive random features) or 'relu' (ReLU features
        plus `RELU_EPSILON`).
      causal: position i attends positions <= i; nothing later enters its computation.
      padding_mask: optional bool `[batch, seq]`, True for real tokens.
      scale: a positive number; default `1 / sqrt(head_dim)`.
      chunk_size: an int >= 1 or None: the causal chunk, in place of the block sizes' `causal_chunk`
        (as for the other implementations; bidirectional attention ignores
        it); one the compiled kernels cannot take raises NotImplementedError.
      block_sizes: `GpuBlockSizes` (Triton lowering) or `TpuBlockSizes` (Mosaic
        lowering); the type selects the lowering. None: each platform's
        defaults, the platform choosing when lowering (so a CPU host can
        export for either); in interpret mode, the TPU kernels on a TPU host
        and the GPU kernels elsewhere.
      interpret: run the kernels in the Pallas interpreter; None: on a CPU backend.

    Returns:
      `[batch, seq, heads, head_dim]`, q's dtype.
    """
    head_dim = q.shape[-1]
    interpret = common.resolve_interpret(interpret)
    if block_sizes is not None and not interpret:
        block_sizes.check_compiled()
    if block_sizes is not None:
        candidates = (block_sizes,)
    elif interpret or jax.default_backend() == "cpu":
        # Interpreted, or lowered from a CPU host for whichever platform export
        # targets: both lowerings may be traced, so both must accept the options.
        candidates = (GpuBlockSizes(), TpuBlockSizes())
    else:
        # On an accelerator only its own lowering is traced, and only its rules apply.
        candidates = (TpuBlockSizes(),) if jax.default_backend() == "tpu" else (GpuBlockSizes(),)
    if chunk_size is not None and causal:
        candidates = tuple(dataclasses.replace(b, causal_chunk=int(chunk_size)) for b in candidates)
        if not interpret:
            for blocks in candidates:
                try:
                    blocks.check_compiled()
                except ValueError as e:
                    raise NotImplementedError(f"chunk_size={chunk_size}: {e}") from None
    if not interpret:
        for blocks in candidates:
            d_pad, _ = _padded_sizes(_backend_of(blocks), head_dim, projection.shape[-2])
            if _backend_of(blocks) == "gpu" and d_pad > _GPU_MAX_HEAD_DIM:
                raise NotImplementedError(
                    f"the Triton FAVOR+ kernels take head_dim up to {_GPU_MAX_HEAD_DIM}, got {head_dim} "
                    f"(padded to {d_pad}); impl='xla' serves it"
                )
    options = dict(feature_map=feature_map, causal=bool(causal), scale=scale, interpret=interpret)
    if len(candidates) == 1:
        return _favor_on(candidates[0], q, k, v, projection, padding_mask, **options)
    gpu, tpu = candidates
    if interpret:
        block_sizes = tpu if jax.default_backend() == "tpu" else gpu
        return _favor_on(block_sizes, q, k, v, projection, padding_mask, **options)
    # Both branches are traced; lowering keeps only the platform's.
    return jax.lax.platform_dependent(
        q, k, v, projection, padding_mask,
        tpu=functools.partial(_favor_on, tpu, **options),
        default=functools.partial(_favor_on, gpu, **options),
    )


def _padded_sizes(backend: str, head_dim: int, features: int) -> tuple[int, int]:
    """Head and feature dims as the backend's tiles want them."""
    if backend == "gpu":
        # Triton tiles are powers of two, and its matmuls at least 16 on each side.
        return max(16, pl.next_power_of_2(head_dim)), max(16, pl.next_power_of_2(features))
    # Mosaic: full-width blocks take any head_dim; features fill whole lanes.
    return head_dim, -(-features // 128) * 128


def _favor_on(blocks, q, k, v, projection, padding_mask, *, feature_map, causal, scale, interpret):
    batch, seq, heads, head_dim = q.shape
    backend = _backend_of(blocks)
    chunk = blocks.causal_chunk if causal else blocks.bidirectional_chunk
    chunk = min(chunk, max(16, pl.next_power_of_2(seq)))
    features = projection.shape[-2]
    d_pad, m_pad = _padded_sizes(backend, head_dim, features)
    seq_pad = -(-seq // chunk) * chunk
    # Features, products and states in float32 whatever the input dtype, as in
    # the XLA implementation; bfloat16 operands lose the accuracy the tests ask
    # for (module docstring). Matmuls take the platform's default float32
    # precision (TF32 on NVIDIA tensor cores), as XLA's do.
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    spec = _Spec(
        feature_map=feature_map,
        causal=causal,
        scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        features=features,
        compute_dtype=jnp.dtype(compute_dtype).name,
        out_dtype=jnp.dtype(q.dtype).name,
        backend=backend,
        interpret=interpret,
        chunk=chunk,
        # Mosaic takes the features whole (one tile): its VMEM holds them, and
        # lane slices narrower than 128 would not be aligned.
        feature_tile=min(blocks.feature_tile, m_pad) if backend == "gpu" else m_pad,
        num_warps=getattr(blocks, "num_warps", None),
        num_stages=getattr(blocks, "num_stages", None),
    )

    def to_kernel_layout(x):
        x = jnp.swapaxes(x, 1, 2)
        if backend == "gpu":
            # The Triton kernels take their rows in float32 (in the same copy as the transpose):
            # a row chunk converted inside a kernel is a computed matmul operand, which Triton
            # holds in registers across the tile loops where a loaded one stays in shared memory
            # (see `favor_steps._Rows.x`); at bfloat16 that spilled.
            x = x.astype(compute_dtype)
        return jnp.pad(x, [(0, 0), (0, 0), (0, seq_pad - seq), (0, d_pad - head_dim)])

    valid = jnp.ones((batch, seq), bool) if padding_mask is None else padding_mask
    valid = jnp.pad(valid, [(0, 0), (0, seq_pad - seq)]).astype(compute_dtype)[:, None, :, None]
    # The projection carries sqrt(scale), so the kernels' projection matmuls take x as loaded:
    # an operand scaled in registers would be held there in the matmul layout across the tile
    # loops (d/2 float32 registers per thread each), where a loaded one stays in shared memory.
    w = projection.astype(compute_dtype) * math.sqrt(spec.scale)
    w = w.reshape((-1,) + w.shape[-2:])  # [1 or heads, features, head_dim]
    w = jnp.pad(w, [(0, 0), (0, m_pad - features), (0, d_pad - head_dim)])[None]
    out = _favor(spec, to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v), w, valid)
    return jnp.swapaxes(out[:, :, :seq, :head_dim], 1, 2)


# --- custom VJP --------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _favor(spec, q, k, v, w, valid):
    """q, k, v `[batch, heads, seq, head_dim]`; w `[1, 1 or heads, features, head_dim]`;
    valid `[batch, 1, seq, 1]` (1 for real keys and queries)."""
    return _forward(spec, q, k, v, w, valid)[0]


def _favor_fwd(spec, q, k, v, w, valid):
    wants_projection_grad = w.perturbed
    q, k, v, w, valid = (x.value for x in (q, k, v, w, valid))
    out, saved = _forward(spec, q, k, v, w, valid)
    return out, (q, k, v, w, valid, saved, _Static(wants_projection_grad))


def _favor_bwd(spec, residuals, g):
    q, k, v, w, valid, saved, wants_projection_grad = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros(q.shape, q.dtype)
    pass_fn = _causal_backward if spec.causal else _bidirectional_backward
    dq, dk, dv, dw_parts = pass_fn(spec, q, k, v, w, valid, g, saved, wants_projection_grad.value)
    dw = None
    if wants_projection_grad.value:
        # Per-(batch, head) partial sums: reduce over batch, and over heads when shared.
        dw = sum(dw_parts).sum(axis=0, keepdims=True)
        if w.shape[1] == 1:
            dw = dw.sum(axis=1, keepdims=True)
        dw = dw.astype(w.dtype)
    return dq, dk, dv, dw, None


_favor.defvjp(_favor_fwd, _favor_bwd, symbolic_zeros=True)


def _forward(spec, q, k, v, w, valid):
    """Output and what the backward needs besides the inputs."""
    if spec.causal:
        return _causal_forward(spec, q, k, v, w, valid), ()
    return _bidirectional_forward(spec, q, k, v, w, valid)


# --- pass builders -----------------------------------------------------------------------------


def _shape(x, *tail, dtype):
    return jax.ShapeDtypeStruct(x.shape[:2] + tuple(tail), dtype)


def _dw_outputs(spec, q, m, d, wants_dw):
    """Per-chunk partial projection gradients `[B, H, chunks, m, d]`, when wanted."""
    num_chunks = q.shape[2] // spec.chunk
    return [(_shape(q, num_chunks, m, d, dtype=spec.compute_dtype), passes.CHUNKS)] if wants_dw else []


def _sum_chunks(parts):
    return [p.sum(axis=2) for p in parts]


def _chunk_states(spec, k, v, valid, w, name, *, key_maxima=False):
    """Each chunk's own key state, in parallel over (batch, head, chunk).

    Returns `S_c = sum_j phi_c(k_j) v_j^T` `[B, H, chunks, m, d]`, `z_c = sum_j
    phi_c(k_j)` `[B, H, chunks, 1, m]` and the chunk's key maximum `mu_c`
    `[B, H, chunks, 1, 1]` that stabilises them (MASK_VALUE for a chunk with
    no valid key, and for ReLU features, which need no stabiliser); with
    `key_maxima`, also each key's largest logit `[B, H, seq, 1]` (MASK_VALUE at
    padding), which the causal passes take instead of a loop over the features
    of their own.
    """
    m, d = w.shape[-2:]
    cd = spec.compute_dtype
    num_chunks = k.shape[2] // spec.chunk
    outputs = [
        (_shape(k, num_chunks, m, d, dtype=cd), passes.CHUNKS),
        (_shape(k, num_chunks, 1, m, dtype=cd), passes.CHUNKS),
        (_shape(k, num_chunks, 1, 1, dtype=cd), passes.CHUNKS),
    ]
    if key_maxima:
        outputs.append((_shape(k, k.shape[2], 1, dtype=cd), passes.ROWS))
    return passes.run(
        functools.partial(steps.chunk_state_step, spec),
        [(k, passes.ROWS), (v, passes.ROWS), (valid, passes.ROWS), (w, passes.WHOLE)],
        outputs,
        spec.launch(name),
    )


def _affine_scan(log_factor, terms, *, reverse: bool):
    """`X_c = exp(log_factor_c) X_(c-1) + terms_c` over the chunk axis (2), inclusive, from
    `X = 0`; `reverse` runs it from the last chunk. Every factor is <= 1, and each result
    reads only the chunks on its own side (a prefix scan)."""

    def combine(earlier, later):
        (log_a, a), (log_b, b) = earlier, later
        return log_a + log_b, jnp.exp(log_b) * a + b

    return jax.lax.associative_scan(combine, (log_factor, terms), reverse=reverse, axis=2)[1]


def _shift(x, *, later: bool):
    """The chunk axis moved by one, zero-filled: each chunk gets its predecessor's value
    (or, with `later`, its successor's)."""
    zero = jnp.zeros_like(x[:, :, :1])
    return jnp.concatenate([x[:, :, 1:], zero] if later else [zero, x[:, :, :-1]], axis=2)


def _entering_states(states, normalisers, maxima):
    """The feature state each causal chunk starts from, from the chunk-local states.

    With `P_c` the running key maximum before chunk c (the exclusive prefix
    max of the chunk maxima, MASK_VALUE before any key), the state entering
    chunk c + 1 is `E_(c+1) = exp(P_c - P_(c+1)) E_c + exp(mu_c - P_(c+1)) S_c`:
    the carry of a serial walk over the chunks, stabilised by the same running maximum, computed
    by a prefix scan with factors <= 1. Returns `(E_c, Z_c, P_c)` per chunk
    and `log_decay = P_c - P_(c+1)`, the factor the backward scan reuses.
    """
    after = jax.lax.cummax(maxima, axis=2)
    before = jnp.concatenate([jnp.full_like(after[:, :, :1], MASK_VALUE), after[:, :, :-1]], axis=2)
    log_decay = before - after
    weight = jnp.exp(maxima - after)
    state_in = _shift(_affine_scan(log_decay, states * weight, reverse=False), later=False)
    normaliser_in = _shift(_affine_scan(log_decay, normalisers * weight, reverse=False), later=False)
    return state_in, normaliser_in, before, log_decay


def _causal_states(spec, k, v, valid, w, name):
    """`(state_in, normaliser_in, max_in, log_decay, key_max)`: the chunk states entering each
    chunk (`_entering_states`) and each key's largest logit."""
    *local, key_max = _chunk_states(spec, k, v, valid, w, name, key_maxima=True)
    return *_entering_states(*local), key_max


def _causal_forward(spec, q, k, v, w, valid):
    state_in, normaliser_in, max_in, _, key_max = _causal_states(spec, k, v, valid, w, "favor_causal_fwd_states")
    (out,) = passes.run(
        functools.partial(steps.causal_forward_step, spec),
        [(q, passes.ROWS), (k, passes.ROWS), (v, passes.ROWS), (valid, passes.ROWS), (key_max, passes.ROWS),
         (state_in, passes.CHUNKS), (normaliser_in, passes.CHUNKS), (max_in, passes.CHUNKS), (w, passes.WHOLE)],
        [(_shape(q, *q.shape[2:], dtype=spec.out_dtype), passes.ROWS)],
        spec.launch("favor_causal_fwd"),
    )
    return out


def _causal_backward(spec, q, k, v, w, valid, g, saved, wants_dw):
    del saved  # the causal forward saves nothing: the chunk states are recomputed
    m, d = w.shape[-2:]
    cd = spec.compute_dtype
    seq = q.shape[2]
    num_chunks = seq // spec.chunk
    state_in, normaliser_in, max_in, log_decay, key_max = _causal_states(
        spec, k, v, valid, w, "favor_causal_bwd_states"
    )
    rows = [(q, passes.ROWS), (k, passes.ROWS), (v, passes.ROWS), (g, passes.ROWS), (valid, passes.ROWS),
            (key_max, passes.ROWS)]
    entering = [(state_in, passes.CHUNKS), (normaliser_in, passes.CHUNKS), (max_in, passes.CHUNKS)]
    row_terms = passes.run(
        functools.partial(steps.causal_rows_step, spec),
        rows + entering + [(w, passes.WHOLE)],
        [(_shape(q, seq, 1, dtype=cd), passes.ROWS)] * 3,
        spec.launch("favor_causal_bwd_rows"),
    )
    rows += [(x, passes.ROWS) for x in row_terms]
    dq, dstate_local, dnormaliser_local, *dw_q = passes.run(
        functools.partial(steps.causal_dq_step, spec, wants_dw),
        rows + entering + [(w, passes.WHOLE)],
        [
            (_shape(q, seq, d, dtype=q.dtype), passes.ROWS),
            (_shape(q, num_chunks, m, d, dtype=cd), passes.CHUNKS),
            (_shape(q, num_chunks, 1, m, dtype=cd), passes.CHUNKS),
        ]
        + _dw_outputs(spec, q, m, d, wants_dw),
        spec.launch("favor_causal_bwd_dq"),
    )
    # The cotangent of the state leaving each chunk: what the later chunks' rows
    # saw of it, each term carried back with factors exp(P_c - P_(c+1)) <= 1.
    dstate_out = _shift(_affine_scan(log_decay, dstate_local, reverse=True), later=True)
    dnormaliser_out = _shift(_affine_scan(log_decay, dnormaliser_local, reverse=True), later=True)
    dk, dv, *dw_k = passes.run(
        functools.partial(steps.causal_dkv_step, spec, wants_dw),
        rows + [(dstate_out, passes.CHUNKS), (dnormaliser_out, passes.CHUNKS)] + entering[1:] + [(w, passes.WHOLE)],
        [(_shape(q, seq, d, dtype=q.dtype), passes.ROWS)] * 2 + _dw_outputs(spec, q, m, d, wants_dw),
        spec.launch("favor_causal_bwd_dkv"),
    )
    return dq, dk, dv, _sum_chunks(dw_q + dw_k)


def _bidirectional_forward(spec, q, k, v, w, valid):
    kv_parts, z_parts, max_parts = _chunk_states(spec, k, v, valid, w, "favor_bidirectional_fwd_keys")
    # Partial sums rescaled to the maximum over all keys (factors <= 1).
    key_max = jnp.max(max_parts, axis=2)
    factor = jnp.exp(max_parts - key_max[:, :, None])
    kv, z = jnp.sum(kv_parts * factor, axis=2), jnp.sum(z_parts * factor, axis=2)
    (out,) = passes.run(
        functools.partial(steps.query_apply_step, spec),
        [(q, passes.ROWS), (valid, passes.ROWS), (w, passes.WHOLE), (kv, passes.WHOLE), (z, passes.WHOLE)],
        [(_shape(q, *q.shape[2:], dtype=spec.out_dtype), passes.ROWS)],
        spec.launch("favor_bidirectional_fwd_queries"),
    )
    return out, (kv, z, key_max)


def _bidirectional_backward(spec, q, k, v, w, valid, g, saved, wants_dw):
    kv, z, key_max = saved
    m, d = w.shape[-2:]
    cd = spec.compute_dtype
    seq = q.shape[2]
    num_chunks = seq // spec.chunk
    dq, dkv_parts, dz_parts, *dw_q = passes.run(
        functools.partial(steps.query_grad_step, spec, wants_dw),
        [(q, passes.ROWS), (g, passes.ROWS), (valid, passes.ROWS), (w, passes.WHOLE), (kv, passes.WHOLE), (z, passes.WHOLE)],
        [
            (_shape(q, seq, d, dtype=q.dtype), passes.ROWS),
            (_shape(q, num_chunks, m, d, dtype=cd), passes.CHUNKS),
            (_shape(q, num_chunks, 1, m, dtype=cd), passes.CHUNKS),
        ]
        + _dw_outputs(spec, q, m, d, wants_dw),
        spec.launch("favor_bidirectional_bwd_queries"),
    )
    dkv, dz = dkv_parts.sum(axis=2), dz_parts.sum(axis=2)
    dk, dv, *dw_k = passes.run(
        functools.partial(steps.key_grad_step, spec, wants_dw),
        [(k, passes.ROWS), (v, passes.ROWS), (valid, passes.ROWS), (w, passes.WHOLE), (dkv, passes.WHOLE),
         (dz, passes.WHOLE), (key_max, passes.WHOLE)],
        [(_shape(q, seq, d, dtype=q.dtype), passes.ROWS)] * 2 + _dw_outputs(spec, q, m, d, wants_dw),
        spec.launch("favor_bidirectional_bwd_keys"),
    )
    return dq, dk, dv, _sum_chunks(dw_q + dw_k)
