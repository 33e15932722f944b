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
and v in float32 (see `_Rows.x`); the scaling's gradient is XLA's.

The projection's gradient is computed (inside the same passes, as per-chunk partial sums) only when the
projection is being differentiated.

The matmuls take float32 operands (TF32 on NVIDIA tensor cores), accumulating
in float32. bfloat16 operands for the feature products (features against
states, features and the in-chunk scores; the projection kept in float32) were
measured against `favor_xla` in interpret mode (causal, seq 256, 2 heads,
head_dim 64, 64 features, chunk 32, seeded `battery.random_inputs`; each
kernel matmul's operands rounded to bfloat16 by wrapping `_dot`): with
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
from kernels_pallas.common import MASK_VALUE, RELU_EPSILON

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
            # (see `_Rows.x`); at bfloat16 that spilled.
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
        functools.partial(_chunk_state_step, spec),
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
        functools.partial(_causal_forward_step, spec),
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
        functools.partial(_causal_rows_step, spec),
        rows + entering + [(w, passes.WHOLE)],
        [(_shape(q, seq, 1, dtype=cd), passes.ROWS)] * 3,
        spec.launch("favor_causal_bwd_rows"),
    )
    rows += [(x, passes.ROWS) for x in row_terms]
    dq, dstate_local, dnormaliser_local, *dw_q = passes.run(
        functools.partial(_causal_dq_step, spec, wants_dw),
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
        functools.partial(_causal_dkv_step, spec, wants_dw),
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
        functools.partial(_query_apply_step, spec),
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
        functools.partial(_query_grad_step, spec, wants_dw),
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
        functools.partial(_key_grad_step, spec, wants_dw),
        [(k, passes.ROWS), (v, passes.ROWS), (valid, passes.ROWS), (w, passes.WHOLE), (dkv, passes.WHOLE),
         (dz, passes.WHOLE), (key_max, passes.WHOLE)],
        [(_shape(q, seq, d, dtype=q.dtype), passes.ROWS)] * 2 + _dw_outputs(spec, q, m, d, wants_dw),
        spec.launch("favor_bidirectional_bwd_keys"),
    )
    return dq, dk, dv, _sum_chunks(dw_q + dw_k)


# --- kernel bodies: one chunk of one (batch, head) -------------------------------------------
#
# The features are walked in tiles of `spec.feature_tile` columns, so a program
# holds a `[feature_tile, head_dim]` slice of the projection and of a state at a
# time, never the whole `[features, head_dim]` (128 KB each in float32 at
# head_dim 128 with 256 features). What needs every feature of a row, the key
# maxima and the query stabilisers, is a reduction over the tiles first; the
# tiles' features are then recomputed where they are used.


def _dot(a, b, dtype, *, contract=(1, 0)):
    """`a @ b` (contract=(1, 0)), `a @ b^T` ((1, 1)) or `a^T @ b` ((0, 0)), accumulated in float32+."""
    acc = jnp.promote_types(dtype, jnp.float32)
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), (((contract[0],), (contract[1],)), ((), ())),
        preferred_element_type=acc,
    )


def _tiles(spec, width, body, init):
    """Folds `body(cols, t, carry) -> carry` over the feature tiles of a `width`-feature
    array, `cols` the tile's column slice and `t` its index; a single tile is a plain call."""
    tile = spec.feature_tile
    if width == tile:
        return body(slice(None), 0, init)

    def step(t, carry):
        return body(pl.ds(pl.multiple_of(t * tile, tile), tile), t, carry)

    return jax.lax.fori_loop(0, width // tile, step, init)


def _feature_ok(spec, t, width):
    """`[1, width]`: True for the real features of tile t, False for the backend's padding."""
    return jax.lax.broadcasted_iota(jnp.int32, (1, width), 1) + t * width < spec.features


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One chunk of query or key rows, projected a feature tile at a time.

    With `x' = sqrt(scale) x` and the kernels' projection `W' = sqrt(scale) W`,
    the projections are `x W'^T = x' W^T`.
    """

    ref: object  # the `[C, d]` ref of the rows
    half_square: jax.Array  # [C, 1] |x'|^2 / 2

    @property
    def x(self) -> jax.Array:
        """The rows, loaded afresh at each use. Triton keeps a matmul operand loaded inside a
        tile loop in shared memory; one loaded before the loops and used in several of them
        is held in registers, in the matmul layout, across all of them (with `[C, d]` float32
        that is d/2 registers per thread, per operand and loop), which is what spilled."""
        return self.ref[...]


def _rows(spec, ref) -> _Rows:
    x = ref[...].astype(spec.compute_dtype)
    return _Rows(ref=ref, half_square=(0.5 * spec.scale) * jnp.sum(x * x, axis=1, keepdims=True))


def _projected(spec, rows: _Rows, w_tile, t):
    """`(x' W_t^T, logits)` of a feature tile: `w_f . x' - |x'|^2 / 2` (softmax; MASK_VALUE at
    padded features, so they never win a max) or the ReLU features."""
    proj = _dot(rows.x, w_tile, spec.compute_dtype, contract=(1, 1))
    ok = _feature_ok(spec, t, proj.shape[1])
    if spec.feature_map == "relu":
        return proj, jnp.where(ok, jnp.maximum(proj, 0.0) + RELU_EPSILON, 0.0)
    return proj, jnp.where(ok, proj - rows.half_square, MASK_VALUE)


def _max_logit(spec, rows: _Rows, w_ref, width):
    """`[C, 1]`: each row's largest softmax logit over all features."""

    def body(cols, t, best):
        _, logits = _projected(spec, rows, w_ref[cols, :], t)
        return jnp.maximum(best, jnp.max(logits, axis=1, keepdims=True))

    return _tiles(spec, width, body, jnp.full((rows.ref.shape[0], 1), MASK_VALUE, spec.compute_dtype))


def _usable(spec, normaliser):
    """Features whose key mass is at least sqrt(smallest normal); the others are left out."""
    return normaliser >= math.sqrt(jnp.finfo(spec.compute_dtype).tiny)


def _stabiliser_term(spec, logits, normaliser):
    """`max_f (logit_if + log z_if)` over one tile's usable features, `[C, 1]`."""
    usable = _usable(spec, normaliser)
    shifted = jnp.where(usable, logits + jnp.log(jnp.where(usable, normaliser, 1.0)), MASK_VALUE)
    return jnp.max(shifted, axis=1, keepdims=True)


def _finish_stabiliser(c):
    return jnp.where(c > MASK_VALUE / 2, c, 0.0)  # a row with no key: every feature unusable


def _query_tile(spec, logits, normaliser, c):
    """`longjax.attention.favor._query_features` for one tile: `exp(logit - c_i)` at usable
    features, with `c_i` the row's stabiliser over all tiles (ReLU: the features as they are)."""
    if spec.feature_map == "relu":
        return logits
    return jnp.exp(jnp.where(_usable(spec, normaliser), logits - c, MASK_VALUE))


def _normalise(spec, num, den, valid):
    """`(num / den, 1 / den)`, both zero where den is below the smallest normal (no key) or the
    row is padding: never NaN or Inf."""
    ok = (den >= jnp.finfo(spec.compute_dtype).tiny) & (valid > 0)
    safe = jnp.where(ok, den, 1.0)  # before dividing: 0/0 would poison the selects
    inverse = jnp.where(ok, 1.0 / safe, 0.0)
    return (None if num is None else jnp.where(ok, num / safe, 0.0)), inverse


def _logit_grad(spec, dfeat, feat, proj, t, mask=None):
    """The gradient wrt one tile's projections `x' W_t^T`, given that wrt its features.

    Softmax features are `exp(logit - stabiliser)` (stabiliser constant), so
    the logit gradient is `feat * dfeat`. ReLU features `relu(x' W^T) + eps`
    pass the gradient where the projection is positive; `mask` (`[rows, 1]`)
    zeroes rows whose features were zeroed.
    """
    if spec.feature_map == "softmax":
        return feat * dfeat
    dlogit = jnp.where((proj > 0) & _feature_ok(spec, t, proj.shape[1]), dfeat, 0.0)
    return dlogit if mask is None else jnp.where(mask > 0, dlogit, 0.0)


def _input_grad(spec, rows: _Rows, dx, dlogit_sum, *, transposed=False):
    """dx from `sum_t dlogit_t W'_t` (`[C, d]`, or `[d, C]` from a transposed accumulation) and
    the row sums of the logit gradients (softmax logits hold `-|x'|^2 / 2 = -scale |x|^2 / 2`)."""
    if transposed:
        dx = dx.T
    if spec.feature_map == "softmax":
        dx = dx - rows.x.astype(spec.compute_dtype) * (spec.scale * dlogit_sum)
    return dx


def _grad_init(rows: _Rows, *, transposed=False):
    """The accumulators of `_grad_step`: `sum_t dlogit_t W'_t` (`[d, C]` when `transposed`) and
    the logit gradients' row sums `[C, 1]`."""
    shape = rows.ref.shape[::-1] if transposed else rows.ref.shape
    return jnp.zeros(shape, rows.half_square.dtype), jnp.zeros_like(rows.half_square)


def _grad_step(spec, grads, dlogit, w_tile, *, transposed=False):
    dx, dlogit_sum = grads
    if transposed:
        # Transposed, `[d, C]`: with d the matmul's rows, Triton's layout for a chain of matmuls
        # (warps stacked along the rows) spreads the accumulator over every warp, where a
        # `[C, d]` one (C = 32 < 16 * warps) is held whole by each pair of warps.
        step = _dot(w_tile, dlogit, spec.compute_dtype, contract=(0, 1))
    else:
        step = _dot(dlogit, w_tile, spec.compute_dtype)
    return dx + step, dlogit_sum + jnp.sum(dlogit, axis=1, keepdims=True)


def _row_cotangents(spec, g, out, inv):
    """`a_i = g_i / den_i` and `b_i = -(g_i . out_i) / den_i`, the cotangents of each row's
    numerator and denominator; also `g_i . out_i`."""
    g = g.astype(spec.compute_dtype)
    delta = jnp.sum(g * out, axis=1, keepdims=True)
    return g * inv, -delta * inv, delta


@dataclasses.dataclass(frozen=True)
class _CausalChunk:
    """What one causal chunk needs of every feature (rows i, keys j of the chunk)."""

    q: _Rows
    k: _Rows
    valid: jax.Array  # [C, 1]
    max_col: jax.Array  # [C, 1] M_i, the running key max at row i (softmax)
    decay: jax.Array  # [C, 1] exp(M_prev - M_i): entering-state terms seen from row i
    rescale: jax.Array  # [C, C] exp(M_j - M_i) for j <= i, else 0
    to_end: jax.Array  # [C, 1] exp(M_j - M_end): key j in the state leaving the chunk
    stabiliser: jax.Array  # [C, 1] each row's query stabiliser c_i (softmax)


def _causal_chunk(spec, q_ref, k_ref, valid, key_max, w_ref, z_ref, max_prev, stabiliser=None) -> _CausalChunk:
    """A causal chunk's running maxima and query stabilisers, from its inputs (`key_max` `[C, 1]`
    each key's largest logit, from the chunk-state pass) and the state entering it (running max
    `max_prev` `[1, 1]`, normaliser `z_ref` `[1, m]`). `stabiliser` `[C, 1]`: the query
    stabilisers as an earlier pass found them; None: found here, by a loop over the features."""
    cd = spec.compute_dtype
    n = q_ref.shape[0]
    width = w_ref.shape[0]
    i = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    causal = j <= i
    rows_q, rows_k = _rows(spec, q_ref), _rows(spec, k_ref)
    if spec.feature_map == "softmax":
        # The running max over valid keys up to each position, as a row and as a
        # column (transposed through a diagonal select: no 1-D vectors in the kernel).
        max_row = jnp.maximum(max_prev, jnp.max(jnp.where(i <= j, key_max, MASK_VALUE), axis=0, keepdims=True))
        max_col = jnp.max(jnp.where(i == j, max_row, MASK_VALUE), axis=1, keepdims=True)
        max_end = jnp.maximum(max_prev, jnp.max(key_max, axis=0, keepdims=True))
        decay = jnp.exp(max_prev - max_col)
        rescale = jnp.where(causal, jnp.exp(jnp.minimum(max_row - max_col, 0.0)), 0.0)
        to_end = jnp.exp(max_col - max_end)
    else:
        ones = jnp.ones((n, 1), cd)
        max_col, decay, to_end = ones, ones, ones
        rescale = jnp.where(causal, 1.0, 0.0).astype(cd)
    ch = _CausalChunk(
        q=rows_q, k=rows_k, valid=valid, max_col=max_col, decay=decay, rescale=rescale, to_end=to_end,
        stabiliser=jnp.zeros((n, 1), cd),
    )
    if spec.feature_map == "relu":
        return ch
    if stabiliser is not None:
        return dataclasses.replace(ch, stabiliser=stabiliser)

    def body(cols, t, c):
        _, logits_q, _, _, normaliser = _causal_tile(spec, ch, w_ref[cols, :], z_ref[:, cols], t)
        return jnp.maximum(c, _stabiliser_term(spec, logits_q, normaliser))

    c = _tiles(spec, width, body, jnp.full((n, 1), MASK_VALUE, cd))
    return dataclasses.replace(ch, stabiliser=_finish_stabiliser(c))


def _causal_tile(spec, ch: _CausalChunk, w_tile, z_tile, t):
    """One feature tile of a causal chunk: `(proj_q, logits_q, proj_k, kf, normaliser)`, the
    key features stabilised by each key's running max and `normaliser` `[C, T]` each row's z_i."""
    proj_q, logits_q = _projected(spec, ch.q, w_tile, t)
    proj_k, logits_k = _projected(spec, ch.k, w_tile, t)
    if spec.feature_map == "softmax":
        # Masking the exponent, not the result: exp(+huge) * 0 would be NaN.
        kf = jnp.exp(jnp.where(ch.valid > 0, logits_k - ch.max_col, MASK_VALUE))
    else:
        kf = jnp.where(ch.valid > 0, logits_k, 0.0)
    normaliser = ch.decay * z_tile + _dot(ch.rescale, kf, spec.compute_dtype)
    return proj_q, logits_q, proj_k, kf, normaliser


def _causal_products(spec, ch: _CausalChunk, w_ref, z_ref, state_ref):
    """`(carried numerator, scores, den)`: `phi(q_i) . E` decayed to row i `[C, d]` (or None
    without `state_ref`), the masked in-chunk `phi(q_i) . phi(k_j)` `[C, C]` and the
    denominators `[C, 1]`, each summed over the feature tiles."""
    cd = spec.compute_dtype
    n, d = ch.q.ref.shape

    def body(cols, t, acc):
        num, scores, den = acc
        _, logits_q, _, kf, normaliser = _causal_tile(spec, ch, w_ref[cols, :], z_ref[:, cols], t)
        qf = _query_tile(spec, logits_q, normaliser, ch.stabiliser)
        if state_ref is not None:
            num = num + _dot(qf, state_ref[cols, :], cd)
        scores = scores + _dot(qf, kf, cd, contract=(1, 1))
        return num, scores, den + jnp.sum(qf * normaliser, axis=1, keepdims=True)

    init = (jnp.zeros((n, d), cd), jnp.zeros((n, n), cd), jnp.zeros((n, 1), cd))
    num, scores, den = _tiles(spec, w_ref.shape[0], body, init)
    return (num * ch.decay if state_ref is not None else None), scores * ch.rescale, den


def _causal_forward_step(spec, ins, outs):
    q_ref, k_ref, v_ref, valid_ref, key_max_ref, state_ref, z_ref, max_ref, w_ref = ins
    (o_ref,) = outs
    valid = valid_ref[...]
    ch = _causal_chunk(spec, q_ref, k_ref, valid, key_max_ref[...], w_ref, z_ref, max_ref[...])
    carried, scores, den = _causal_products(spec, ch, w_ref, z_ref, state_ref)
    out, _ = _normalise(spec, carried + _dot(scores, v_ref[...], spec.compute_dtype), den, valid)
    o_ref[...] = out.astype(o_ref.dtype)


def _causal_rows_step(spec, ins, outs):
    """The per-row terms of the causal backward: each row's query stabiliser `c_i`, `1 / den_i`
    and `g_i . out_i` (all `[C, 1]`), from a recomputation of the forward. The dq and dk/dv
    passes take them instead of two loops over the features each."""
    q_ref, k_ref, v_ref, g_ref, valid_ref, key_max_ref, state_ref, z_ref, max_ref, w_ref = ins
    c_ref, inv_ref, delta_ref = outs
    valid = valid_ref[...]
    ch = _causal_chunk(spec, q_ref, k_ref, valid, key_max_ref[...], w_ref, z_ref, max_ref[...])
    carried, scores, den = _causal_products(spec, ch, w_ref, z_ref, state_ref)
    out, inv = _normalise(spec, carried + _dot(scores, v_ref[...], spec.compute_dtype), den, valid)
    _, _, delta = _row_cotangents(spec, g_ref[...], out, inv)
    c_ref[...] = ch.stabiliser.astype(c_ref.dtype)
    inv_ref[...] = inv.astype(inv_ref.dtype)
    delta_ref[...] = delta.astype(delta_ref.dtype)


def _causal_row_terms(spec, row_refs, z_ref, max_ref, w_ref):
    """The chunk, the row cotangents `a = g / den` `[C, d]` and `b = -(g . out) / den` `[C, 1]`
    of a dq or dk/dv step; `row_refs` are the steps' row operands, the rows pass's last."""
    q_ref, k_ref, _, g_ref, valid_ref, key_max_ref, c_ref, inv_ref, delta_ref = row_refs
    ch = _causal_chunk(
        spec, q_ref, k_ref, valid_ref[...], key_max_ref[...], w_ref, z_ref, max_ref[...], c_ref[...]
    )
    inv = inv_ref[...]
    return ch, g_ref[...].astype(spec.compute_dtype) * inv, -delta_ref[...] * inv


def _causal_dq_step(spec, wants_dw, ins, outs):
    """dq and what the chunk's rows saw of the entering state: `seen^T a` `[m, d]` and
    `sum_i seen_i b_i` `[1, m]` (the local cotangent of that state)."""
    *row_refs, state_ref, z_ref, max_ref, w_ref = ins
    dq_ref, dstate_ref, dz_ref, *dw_ref = outs
    v_ref = row_refs[2]
    cd = spec.compute_dtype
    ch, a, b = _causal_row_terms(spec, row_refs, z_ref, max_ref, w_ref)
    a_v = _dot(a, v_ref[...], cd, contract=(1, 1)) * ch.rescale

    def body(cols, t, grads):
        w_tile, state = w_ref[cols, :], state_ref[cols, :]
        proj_q, logits_q, _, kf, normaliser = _causal_tile(spec, ch, w_tile, z_ref[:, cols], t)
        qf = _query_tile(spec, logits_q, normaliser, ch.stabiliser)
        dqf = _dot(a, state, cd, contract=(1, 1)) * ch.decay + _dot(a_v, kf, cd) + b * normaliser
        dlogit = _logit_grad(spec, dqf, qf, proj_q, t)
        # Every factor exp(M_prev - M_i) <= 1.
        seen = qf * ch.decay
        dstate_ref[cols, :] = _dot(a, seen, cd, contract=(0, 0)).T.astype(dstate_ref.dtype)
        dz_ref[:, cols] = jnp.sum(seen * b, axis=0, keepdims=True).astype(dz_ref.dtype)
        if wants_dw:
            dw_ref[0][cols, :] = _dot(dlogit, ch.q.x, cd, contract=(0, 0)).astype(dw_ref[0].dtype)
        return _grad_step(spec, grads, dlogit, w_tile, transposed=True)

    grads = _tiles(spec, w_ref.shape[0], body, _grad_init(ch.q, transposed=True))
    dq = _input_grad(spec, ch.q, *grads, transposed=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _causal_dkv_step(spec, wants_dw, ins, outs):
    """dk and dv, given the cotangent `dstate`, `dnormaliser` of the state leaving the chunk."""
    *row_refs, dstate_ref, dz_ref, z_ref, max_ref, w_ref = ins
    dk_ref, dv_ref, *dw_ref = outs
    v_ref = row_refs[2]
    cd = spec.compute_dtype
    ch, a, b = _causal_row_terms(spec, row_refs, z_ref, max_ref, w_ref)
    valid = ch.valid
    # d(score_ij) for the in-chunk pairs: through row i's numerator and denominator.
    dscores = ch.rescale * (_dot(a, v_ref[...], cd, contract=(1, 1)) + b)

    def body(cols, t, carry):
        grads, dv, scores = carry
        w_tile, dstate = w_ref[cols, :], dstate_ref[cols, :]
        _, logits_q, proj_k, kf, normaliser = _causal_tile(spec, ch, w_tile, z_ref[:, cols], t)
        qf = _query_tile(spec, logits_q, normaliser, ch.stabiliser)
        scores = scores + _dot(qf, kf, cd, contract=(1, 1))
        leaving = kf * ch.to_end
        dv = dv + _dot(leaving, dstate, cd)
        dkf = _dot(dscores, qf, cd, contract=(0, 0))
        dkf = dkf + ch.to_end * (_dot(v_ref[...], dstate, cd, contract=(1, 1)) + dz_ref[:, cols])
        dlogit = _logit_grad(spec, dkf, kf, proj_k, t, mask=valid)
        if wants_dw:
            dw_ref[0][cols, :] = _dot(dlogit, ch.k.x, cd, contract=(0, 0)).astype(dw_ref[0].dtype)
        return _grad_step(spec, grads, dlogit, w_tile), dv, scores

    n, d = ch.k.ref.shape
    init = (_grad_init(ch.k), jnp.zeros((n, d), cd), jnp.zeros((n, n), cd))
    grads, dv, scores = _tiles(spec, w_ref.shape[0], body, init)
    # The in-chunk pairs' part of dv, from the scores summed over the tiles.
    dv = dv + _dot(scores * ch.rescale, a, cd, contract=(0, 0))
    dk_ref[...] = _input_grad(spec, ch.k, *grads).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _key_tile(spec, rows: _Rows, valid, w_tile, t, key_max):
    """`(proj, kf)` of one tile of key features stabilised by `key_max` (`[1, 1]`); zero at
    invalid keys."""
    proj, logits = _projected(spec, rows, w_tile, t)
    if spec.feature_map == "relu":
        return proj, jnp.where(valid > 0, logits, 0.0)
    return proj, jnp.exp(jnp.where(valid > 0, logits - key_max, MASK_VALUE))


def _chunk_state_step(spec, ins, outs):
    """The chunk's `phi(K)^T V` `[m, d]`, `sum phi(K)` `[1, m]` and key maximum `[1, 1]`,
    features stabilised by that maximum; optionally each key's largest logit `[C, 1]`."""
    k_ref, v_ref, valid_ref, w_ref = ins
    kv_ref, z_ref, max_ref, *key_max_ref = outs
    cd = spec.compute_dtype
    rows, valid, v = _rows(spec, k_ref), valid_ref[...], v_ref[...]
    width = w_ref.shape[0]
    row_max = jnp.full(valid.shape, MASK_VALUE, cd)
    if spec.feature_map == "softmax":
        row_max = jnp.where(valid > 0, _max_logit(spec, rows, w_ref, width), MASK_VALUE)
    chunk_max = jnp.max(row_max, axis=0, keepdims=True)
    if key_max_ref:
        key_max_ref[0][...] = row_max.astype(key_max_ref[0].dtype)

    def body(cols, t, carry):
        _, kf = _key_tile(spec, rows, valid, w_ref[cols, :], t, chunk_max)
        kv_ref[cols, :] = _dot(kf, v, cd, contract=(0, 0)).astype(kv_ref.dtype)
        z_ref[:, cols] = jnp.sum(kf, axis=0, keepdims=True).astype(z_ref.dtype)
        return carry

    _tiles(spec, width, body, ())
    max_ref[...] = chunk_max.astype(max_ref.dtype)


def _bidirectional_products(spec, rows: _Rows, w_ref, kv_ref, z_ref):
    """`(num, den, stabiliser)` of a chunk of queries against the whole key state."""
    cd = spec.compute_dtype
    n, d = rows.ref.shape
    width = w_ref.shape[0]
    c = jnp.zeros((n, 1), cd)
    if spec.feature_map == "softmax":

        def reduce(cols, t, best):
            _, logits = _projected(spec, rows, w_ref[cols, :], t)
            return jnp.maximum(best, _stabiliser_term(spec, logits, z_ref[:, cols]))

        c = _finish_stabiliser(_tiles(spec, width, reduce, jnp.full((n, 1), MASK_VALUE, cd)))

    def body(cols, t, acc):
        num, den = acc
        normaliser = z_ref[:, cols]
        _, logits = _projected(spec, rows, w_ref[cols, :], t)
        qf = _query_tile(spec, logits, normaliser, c)
        return num + _dot(qf, kv_ref[cols, :], cd), den + jnp.sum(qf * normaliser, axis=1, keepdims=True)

    num, den = _tiles(spec, width, body, (jnp.zeros((n, d), cd), jnp.zeros((n, 1), cd)))
    return num, den, c


def _query_apply_step(spec, ins, outs):
    q_ref, valid_ref, w_ref, kv_ref, z_ref = ins
    (o_ref,) = outs
    num, den, _ = _bidirectional_products(spec, _rows(spec, q_ref), w_ref, kv_ref, z_ref)
    out, _ = _normalise(spec, num, den, valid_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)


def _query_grad_step(spec, wants_dw, ins, outs):
    """dq and the chunk's partial sums of `dKV = sum_i phi(q_i) a_i^T` and dz."""
    q_ref, g_ref, valid_ref, w_ref, kv_ref, z_ref = ins
    dq_ref, dkv_ref, dz_ref, *dw_ref = outs
    cd = spec.compute_dtype
    rows = _rows(spec, q_ref)
    num, den, c = _bidirectional_products(spec, rows, w_ref, kv_ref, z_ref)
    out, inv = _normalise(spec, num, den, valid_ref[...])
    a, b, _ = _row_cotangents(spec, g_ref[...], out, inv)

    def body(cols, t, grads):
        w_tile, normaliser = w_ref[cols, :], z_ref[:, cols]
        proj, logits = _projected(spec, rows, w_tile, t)
        qf = _query_tile(spec, logits, normaliser, c)
        dqf = _dot(a, kv_ref[cols, :], cd, contract=(1, 1)) + b * normaliser
        dlogit = _logit_grad(spec, dqf, qf, proj, t)
        dkv_ref[cols, :] = _dot(qf, a, cd, contract=(0, 0)).astype(dkv_ref.dtype)
        dz_ref[:, cols] = jnp.sum(qf * b, axis=0, keepdims=True).astype(dz_ref.dtype)
        if wants_dw:
            dw_ref[0][cols, :] = _dot(dlogit, rows.x, cd, contract=(0, 0)).astype(dw_ref[0].dtype)
        return _grad_step(spec, grads, dlogit, w_tile)

    dq = _input_grad(spec, rows, *_tiles(spec, w_ref.shape[0], body, _grad_init(rows)))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _key_grad_step(spec, wants_dw, ins, outs):
    k_ref, v_ref, valid_ref, w_ref, dkv_ref, dz_ref, max_ref = ins
    dk_ref, dv_ref, *dw_ref = outs
    cd = spec.compute_dtype
    rows, valid, v, key_max = _rows(spec, k_ref), valid_ref[...], v_ref[...], max_ref[...]

    def body(cols, t, carry):
        grads, dv = carry
        w_tile, dkv = w_ref[cols, :], dkv_ref[cols, :]
        proj, kf = _key_tile(spec, rows, valid, w_tile, t, key_max)
        dv = dv + _dot(kf, dkv, cd)
        dkf = _dot(v, dkv, cd, contract=(1, 1)) + dz_ref[:, cols]
        dlogit = _logit_grad(spec, dkf, kf, proj, t, mask=valid)
        if wants_dw:
            dw_ref[0][cols, :] = _dot(dlogit, rows.x, cd, contract=(0, 0)).astype(dw_ref[0].dtype)
        return _grad_step(spec, grads, dlogit, w_tile), dv

    grads, dv = _tiles(spec, w_ref.shape[0], body, (_grad_init(rows), jnp.zeros(rows.ref.shape, cd)))
    dk_ref[...] = _input_grad(spec, rows, *grads).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
