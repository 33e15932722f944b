"""Pallas FAVOR+ (Performer) attention: causal chunked and bidirectional, forward and backward.

The numerical contract is `longjax.attention.favor`'s, term for term: the
same softmax features with the causal running-max key stabiliser and the
query stabiliser (or the ReLU map), padding excluded from numerator and
denominator, float32 states, stabilisers (and the usable-feature selection)
held constant in the gradient. Features are computed inside the kernels from
q, k and the projection, so no `[seq, features]` array reaches memory.

Passes (each a chunk walk of `favor_walk`, one per (batch, head)):

* causal forward: walk the chunks carrying the float32 state
  `S = sum_j phi(k_j) v_j^T` `[features, head_dim]`, the normaliser
  `z = sum_j phi(k_j)` and the running key maximum; within a chunk, the exact
  masked product of the chunk's query and key features.
* causal backward: (1) a forward walk that recomputes S and z, giving dq, the
  row terms `g_i . out_i`, and the chunk-start normaliser and running maximum
  (`[features]` and a scalar per chunk: what the second walk needs to rebuild
  each row's query stabiliser); (2) a reverse walk carrying the cotangent
  state `dS` `[features, head_dim]` and `dz`, giving dk and dv. Every carried
  factor is `exp(M_earlier - M_later) <= 1`; no per-position state is stored
  and no earlier state is recovered by subtraction.
* bidirectional forward: one walk reduces `phi(K)^T V`, the normaliser and the
  key maximum (rescaling online as the maximum grows); an independent pass
  applies `phi(Q)` to them.
* bidirectional backward: a walk over query chunks gives dq and reduces
  `dKV = sum_i phi(q_i) a_i^T` and dz; an independent pass over key chunks
  gives dk and dv.

The projection's gradient is computed (inside the same walks) only when the
projection is being differentiated.

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
from kernels_pallas import favor_walk as walk
from kernels_pallas.common import MASK_VALUE, RELU_EPSILON

# Widest (padded) head the Triton walks take: their float32 [features, head_dim]
# state lives in registers (the lowering tests cover 64 and 128).
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
      causal_chunk: rows per step of the causal walks (forward and backward):
        the side of the exact in-chunk `[chunk, chunk]` product.
      bidirectional_chunk: rows per step of the bidirectional passes.
      num_warps: warps per program. The walks carry a float32
        `[features, head_dim]` state in registers, so more warps mean fewer
        registers per thread for it.
      num_stages: software-pipelining stages of the chunk loop.

    Compiled, chunks must be powers of two >= 16 (Triton tiles are powers of
    two, `tl.dot` at least 16 on each side); interpret mode takes any chunk.
    """

    causal_chunk: int = 64
    bidirectional_chunk: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        _check_chunks(self)
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
      causal_chunk: rows per step of the causal walks (forward and backward).
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
    num_warps: int | None
    num_stages: int | None

    def launch(self, order: str, name: str) -> walk.Launch:
        return walk.Launch(
            backend=self.backend, order=order, chunk=self.chunk, interpret=self.interpret,
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
    the compiled lowerings take, and the widest head of the Triton walks.

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
    # the XLA implementation: bfloat16 feature products measured 2-3x its error
    # against a float32 evaluation. Matmuls take the platform's default float32
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
        num_warps=getattr(blocks, "num_warps", None),
        num_stages=getattr(blocks, "num_stages", None),
    )

    def to_kernel_layout(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, [(0, 0), (0, 0), (0, seq_pad - seq), (0, d_pad - head_dim)])

    valid = jnp.ones((batch, seq), bool) if padding_mask is None else padding_mask
    valid = jnp.pad(valid, [(0, 0), (0, seq_pad - seq)]).astype(compute_dtype)[:, None, :, None]
    w = projection.astype(compute_dtype)
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


def _state_init(spec, m, d, *, with_max: bool, extra=()):
    """A walk's initial carry: `[m, d]` state and `[1, m]` normaliser (and `[1, 1]` running max)."""
    cd = spec.compute_dtype

    def init():
        carry = (jnp.zeros((m, d), cd), jnp.zeros((1, m), cd))
        if with_max:
            carry += (jnp.full((1, 1), MASK_VALUE, cd),)
        return carry + tuple(jnp.zeros(s, cd) for s in extra)

    return init


def _causal_forward(spec, q, k, v, w, valid):
    m, d = w.shape[-2:]
    (out,) = walk.run(
        functools.partial(_causal_forward_step, spec),
        [(q, walk.ROWS), (k, walk.ROWS), (v, walk.ROWS), (valid, walk.ROWS), (w, walk.WHOLE)],
        [(_shape(q, *q.shape[2:], dtype=spec.out_dtype), walk.ROWS)],
        spec.launch(walk.FORWARD, "favor_causal_fwd"),
        init=_state_init(spec, m, d, with_max=True),
    )
    return out


def _causal_backward(spec, q, k, v, w, valid, g, saved, wants_dw):
    del saved  # the causal forward saves nothing: the first walk recomputes it
    m, d = w.shape[-2:]
    cd = spec.compute_dtype
    seq = q.shape[2]
    num_chunks = seq // spec.chunk
    dw_shape = [(_shape(q, m, d, dtype=cd), walk.WHOLE)] if wants_dw else []
    dw_init = [(m, d)] if wants_dw else []
    rows = [(q, walk.ROWS), (k, walk.ROWS), (v, walk.ROWS), (g, walk.ROWS), (valid, walk.ROWS)]
    dq, delta, z_start, max_start, *dw_q = walk.run(
        functools.partial(_causal_dq_step, spec, wants_dw),
        rows + [(w, walk.WHOLE)],
        [
            (_shape(q, seq, d, dtype=spec.out_dtype), walk.ROWS),
            (_shape(q, seq, 1, dtype=cd), walk.ROWS),
            (_shape(q, num_chunks, 1, m, dtype=cd), walk.CHUNKS),
            (_shape(q, num_chunks, 1, 1, dtype=cd), walk.CHUNKS),
        ]
        + dw_shape,
        spec.launch(walk.FORWARD, "favor_causal_bwd_dq"),
        init=_state_init(spec, m, d, with_max=True, extra=dw_init),
        finish=(lambda carry, _: carry[3:]) if wants_dw else None,
    )
    dk, dv, *dw_k = walk.run(
        functools.partial(_causal_dkv_step, spec, wants_dw),
        rows + [(delta, walk.ROWS), (z_start, walk.CHUNKS), (max_start, walk.CHUNKS), (w, walk.WHOLE)],
        [(_shape(q, seq, d, dtype=spec.out_dtype), walk.ROWS)] * 2 + dw_shape,
        spec.launch(walk.REVERSE, "favor_causal_bwd_dkv"),
        init=_state_init(spec, m, d, with_max=False, extra=dw_init),
        finish=(lambda carry, _: carry[2:]) if wants_dw else None,
    )
    return dq, dk, dv, dw_q + dw_k


def _bidirectional_forward(spec, q, k, v, w, valid):
    m, d = w.shape[-2:]
    cd = spec.compute_dtype
    kv, z, key_max = walk.run(
        functools.partial(_key_reduce_step, spec),
        [(k, walk.ROWS), (v, walk.ROWS), (valid, walk.ROWS), (w, walk.WHOLE)],
        [
            (_shape(k, m, d, dtype=cd), walk.WHOLE),
            (_shape(k, 1, m, dtype=cd), walk.WHOLE),
            (_shape(k, 1, 1, dtype=cd), walk.WHOLE),
        ],
        spec.launch(walk.FORWARD, "favor_bidirectional_fwd_keys"),
        init=_state_init(spec, m, d, with_max=True),
        finish=lambda carry, _: carry,
    )
    (out,) = walk.run(
        functools.partial(_query_apply_step, spec),
        [(q, walk.ROWS), (valid, walk.ROWS), (w, walk.WHOLE), (kv, walk.WHOLE), (z, walk.WHOLE)],
        [(_shape(q, *q.shape[2:], dtype=spec.out_dtype), walk.ROWS)],
        spec.launch(walk.INDEPENDENT, "favor_bidirectional_fwd_queries"),
    )
    return out, (kv, z, key_max)


def _bidirectional_backward(spec, q, k, v, w, valid, g, saved, wants_dw):
    kv, z, key_max = saved
    m, d = w.shape[-2:]
    cd = spec.compute_dtype
    seq = q.shape[2]
    dw_shape = [(_shape(q, m, d, dtype=cd), walk.WHOLE)] if wants_dw else []
    dw_init = [(m, d)] if wants_dw else []
    dq, dkv, dz, *dw_q = walk.run(
        functools.partial(_query_grad_step, spec, wants_dw),
        [(q, walk.ROWS), (g, walk.ROWS), (valid, walk.ROWS), (w, walk.WHOLE), (kv, walk.WHOLE), (z, walk.WHOLE)],
        [
            (_shape(q, seq, d, dtype=spec.out_dtype), walk.ROWS),
            (_shape(q, m, d, dtype=cd), walk.WHOLE),
            (_shape(q, 1, m, dtype=cd), walk.WHOLE),
        ]
        + dw_shape,
        spec.launch(walk.FORWARD, "favor_bidirectional_bwd_queries"),
        init=_state_init(spec, m, d, with_max=False, extra=dw_init),
        finish=lambda carry, _: carry,
    )
    # Without a projection gradient the key chunks are independent.
    dk, dv, *dw_k = walk.run(
        functools.partial(_key_grad_step, spec, wants_dw),
        [(k, walk.ROWS), (v, walk.ROWS), (valid, walk.ROWS), (w, walk.WHOLE), (dkv, walk.WHOLE),
         (dz, walk.WHOLE), (key_max, walk.WHOLE)],
        [(_shape(q, seq, d, dtype=spec.out_dtype), walk.ROWS)] * 2 + dw_shape,
        spec.launch(walk.FORWARD if wants_dw else walk.INDEPENDENT, "favor_bidirectional_bwd_keys"),
        init=(lambda: (jnp.zeros((m, d), cd),)) if wants_dw else tuple,
        finish=(lambda carry, _: carry) if wants_dw else None,
    )
    return dq, dk, dv, dw_q + dw_k


# --- kernel bodies: one chunk of one (batch, head), as values ----------------------------------


def _dot(a, b, dtype, *, contract=(1, 0)):
    """`a @ b` (contract=(1, 0)), `a @ b^T` ((1, 1)) or `a^T @ b` ((0, 0)), accumulated in float32+."""
    acc = jnp.promote_types(dtype, jnp.float32)
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), (((contract[0],), (contract[1],)), ((), ())),
        preferred_element_type=acc,
    )


def _feature_ok(spec, width):
    """`[1, width]`: True for real features, False for the backend's padding."""
    return jax.lax.broadcasted_iota(jnp.int32, (1, width), 1) < spec.features


def _project(spec, x, w):
    """`(x', x' W^T)` for a chunk `x` `[rows, head_dim]`, with `x' = sqrt(scale) x`."""
    xs = x.astype(spec.compute_dtype) * math.sqrt(spec.scale)
    return xs, _dot(xs, w, spec.compute_dtype, contract=(1, 1))


def _softmax_logits(spec, xs, proj):
    """`w_f . x' - |x'|^2 / 2`, and MASK_VALUE at padded features (so they never win a max)."""
    logits = proj - 0.5 * jnp.sum(xs * xs, axis=1, keepdims=True)
    return jnp.where(_feature_ok(spec, proj.shape[1]), logits, MASK_VALUE)


def _relu_features(spec, proj):
    return jnp.where(_feature_ok(spec, proj.shape[1]), jnp.maximum(proj, 0.0) + RELU_EPSILON, 0.0)


def _query_features(spec, logits, normaliser):
    """`longjax.attention.favor._query_features` for one chunk of rows.

    `c_i = max_f (logit_if + log z_if)` over the features whose key mass z_if
    is at least sqrt(smallest normal); the others are left out (zero).
    """
    cd = spec.compute_dtype
    usable = normaliser >= math.sqrt(jnp.finfo(cd).tiny)
    shifted = jnp.where(usable, logits + jnp.log(jnp.where(usable, normaliser, 1.0)), MASK_VALUE)
    c = jnp.max(shifted, axis=1, keepdims=True)
    c = jnp.where(c > MASK_VALUE / 2, c, 0.0)  # a row with no key: every feature unusable
    return jnp.exp(jnp.where(usable, logits - c, MASK_VALUE))


def _normalise(spec, num, den, valid):
    """`(num / den, 1 / den)`, both zero where den is below the smallest normal (no key) or the
    row is padding: never NaN or Inf."""
    ok = (den >= jnp.finfo(spec.compute_dtype).tiny) & (valid > 0)
    safe = jnp.where(ok, den, 1.0)  # before dividing: 0/0 would poison the selects
    inverse = jnp.where(ok, 1.0 / safe, 0.0)
    return (None if num is None else jnp.where(ok, num / safe, 0.0)), inverse


def _input_grads(spec, dfeat, feat, xs, proj, w, mask=None):
    """Gradients wrt the chunk's inputs and the projection, given those wrt its features.

    Softmax features are `exp(logit - stabiliser)` (stabiliser constant), so the
    logit gradient is `feat * dfeat`; `logit = x' W^T - |x'|^2 / 2`. ReLU
    features `relu(x' W^T) + eps` pass the gradient where the projection is
    positive; `mask` (`[rows, 1]`) zeroes rows whose features were zeroed.
    """
    cd = spec.compute_dtype
    if spec.feature_map == "softmax":
        dlogit = feat * dfeat
        dxs = _dot(dlogit, w, cd) - xs * jnp.sum(dlogit, axis=1, keepdims=True)
    else:
        dlogit = jnp.where((proj > 0) & _feature_ok(spec, proj.shape[1]), dfeat, 0.0)
        if mask is not None:
            dlogit = jnp.where(mask > 0, dlogit, 0.0)
        dxs = _dot(dlogit, w, cd)
    return dxs * math.sqrt(spec.scale), dlogit


@dataclasses.dataclass(frozen=True)
class _CausalChunk:
    """One causal chunk's recomputed quantities (rows i, keys j of the chunk)."""

    xq: jax.Array  # [C, d] sqrt(scale) q
    proj_q: jax.Array  # [C, m]
    xk: jax.Array
    proj_k: jax.Array
    qf: jax.Array  # [C, m] query features
    kf: jax.Array  # [C, m] key features, stabilised by each key's own running max M_j
    decay: jax.Array  # [C, 1] exp(M_prev - M_i): carried terms seen from row i
    rescale: jax.Array  # [C, C] exp(M_j - M_i) for j <= i, else 0
    to_end: jax.Array  # [C, 1] exp(M_j - M_end): key j in the carry leaving the chunk
    carry_decay: jax.Array  # [1, 1] exp(M_prev - M_end)
    max_end: jax.Array  # [1, 1] M_end, the running max after the chunk
    normaliser: jax.Array  # [C, m] each row's key normaliser z_i
    scores: jax.Array  # [C, C] phi(q_i) . phi(k_j) exp(M_j - M_i), causal
    den: jax.Array  # [C, 1]


def _causal_chunk(spec, q, k, valid, w, max_prev, z_prev) -> _CausalChunk:
    """Recomputes a causal chunk's features and in-chunk products from its inputs and the
    carry entering it (running max `max_prev` `[1, 1]`, normaliser `z_prev` `[1, m]`)."""
    cd = spec.compute_dtype
    rows = q.shape[0]
    i = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (rows, rows), 1)
    causal = j <= i
    key_valid = valid > 0
    xq, proj_q = _project(spec, q, w)
    xk, proj_k = _project(spec, k, w)
    if spec.feature_map == "softmax":
        logits_q = _softmax_logits(spec, xq, proj_q)
        logits_k = _softmax_logits(spec, xk, proj_k)
        key_max = jnp.where(key_valid, jnp.max(logits_k, axis=1, keepdims=True), MASK_VALUE)  # [C, 1]
        # The running max over valid keys up to each position, as a row and as a
        # column (transposed through a diagonal select: no 1-D vectors in the kernel).
        max_row = jnp.maximum(max_prev, jnp.max(jnp.where(i <= j, key_max, MASK_VALUE), axis=0, keepdims=True))
        max_col = jnp.max(jnp.where(i == j, max_row, MASK_VALUE), axis=1, keepdims=True)
        max_end = jnp.maximum(max_prev, jnp.max(key_max, axis=0, keepdims=True))
        # Masking the exponent, not the result: exp(+huge) * 0 would be NaN.
        kf = jnp.exp(jnp.where(key_valid, logits_k - max_col, MASK_VALUE))
        decay = jnp.exp(max_prev - max_col)
        rescale = jnp.where(causal, jnp.exp(jnp.minimum(max_row - max_col, 0.0)), 0.0)
        to_end = jnp.exp(max_col - max_end)
        carry_decay = jnp.exp(max_prev - max_end)
    else:
        kf = jnp.where(key_valid, _relu_features(spec, proj_k), 0.0)
        ones = jnp.ones((rows, 1), spec.compute_dtype)
        decay, to_end = ones, ones
        rescale = jnp.where(causal, 1.0, 0.0).astype(spec.compute_dtype)
        carry_decay, max_end = jnp.ones((1, 1), spec.compute_dtype), max_prev
    normaliser = decay * z_prev + _dot(rescale, kf, cd)
    if spec.feature_map == "softmax":
        qf = _query_features(spec, logits_q, normaliser)
    else:
        qf = _relu_features(spec, proj_q)
    scores = _dot(qf, kf, cd, contract=(1, 1)) * rescale
    den = jnp.sum(qf * normaliser, axis=1, keepdims=True)
    return _CausalChunk(
        xq=xq, proj_q=proj_q, xk=xk, proj_k=proj_k, qf=qf, kf=kf, decay=decay, rescale=rescale,
        to_end=to_end, carry_decay=carry_decay, max_end=max_end, normaliser=normaliser,
        scores=scores, den=den,
    )


def _causal_numerator(spec, ch: _CausalChunk, state, v):
    cd = spec.compute_dtype
    return _dot(ch.qf, state, cd) * ch.decay + _dot(ch.scores, v, cd)


def _advance(spec, ch: _CausalChunk, v, state, normaliser):
    """The carry leaving the chunk, rescaled to the running max at its end."""
    leaving = ch.kf * ch.to_end
    state = state * ch.carry_decay + _dot(leaving, v, spec.compute_dtype, contract=(0, 0))
    normaliser = normaliser * ch.carry_decay + jnp.sum(leaving, axis=0, keepdims=True)
    return state, normaliser


def _causal_forward_step(spec, values, whole, carry):
    q, k, v, valid = values
    (w,) = whole
    state, normaliser, max_prev = carry
    ch = _causal_chunk(spec, q, k, valid, w, max_prev, normaliser)
    out, _ = _normalise(spec, _causal_numerator(spec, ch, state, v), ch.den, valid)
    state, normaliser = _advance(spec, ch, v, state, normaliser)
    return [out], (state, normaliser, ch.max_end)


def _row_cotangents(spec, g, out, inv):
    """`a_i = g_i / den_i` and `b_i = -(g_i . out_i) / den_i`, the cotangents of each row's
    numerator and denominator; also `g_i . out_i`."""
    g = g.astype(spec.compute_dtype)
    delta = jnp.sum(g * out, axis=1, keepdims=True)
    return g * inv, -delta * inv, delta


def _causal_dq_step(spec, wants_dw, values, whole, carry):
    q, k, v, g, valid = values
    (w,) = whole
    state, normaliser, max_prev, *dw = carry
    cd = spec.compute_dtype
    ch = _causal_chunk(spec, q, k, valid, w, max_prev, normaliser)
    out, inv = _normalise(spec, _causal_numerator(spec, ch, state, v), ch.den, valid)
    a, b, delta = _row_cotangents(spec, g, out, inv)
    dqf = (
        _dot(a, state, cd, contract=(1, 1)) * ch.decay
        + _dot(_dot(a, v, cd, contract=(1, 1)) * ch.rescale, ch.kf, cd)
        + b * ch.normaliser
    )
    dq, dlogit = _input_grads(spec, dqf, ch.qf, ch.xq, ch.proj_q, w)
    chunk_out = [dq, delta, normaliser, max_prev]
    state, new_normaliser = _advance(spec, ch, v, state, normaliser)
    if wants_dw:
        dw = [dw[0] + _dot(dlogit, ch.xq, spec.compute_dtype, contract=(0, 0))]
    return chunk_out, (state, new_normaliser, ch.max_end, *dw)


def _causal_dkv_step(spec, wants_dw, values, whole, carry):
    q, k, v, g, valid, delta, z_start, max_start = values
    (w,) = whole
    dstate, dnormaliser, *dw = carry
    cd = spec.compute_dtype
    ch = _causal_chunk(spec, q, k, valid, w, max_start, z_start)
    _, inv = _normalise(spec, None, ch.den, valid)
    g = g.astype(spec.compute_dtype)
    a, b = g * inv, -delta * inv
    # d(score_ij) for the in-chunk pairs: through row i's numerator and denominator.
    dscores = ch.rescale * (_dot(a, v, cd, contract=(1, 1)) + b)
    leaving = ch.kf * ch.to_end
    dv = _dot(ch.scores, a, cd, contract=(0, 0)) + _dot(leaving, dstate, cd)
    dkf = _dot(dscores, ch.qf, cd, contract=(0, 0))
    dkf = dkf + ch.to_end * (_dot(v, dstate, cd, contract=(1, 1)) + dnormaliser)
    dk, dlogit = _input_grads(spec, dkf, ch.kf, ch.xk, ch.proj_k, w, mask=valid)
    # The cotangent of the carry entering the chunk: every factor exp(M_prev - M_i) <= 1.
    seen = ch.qf * ch.decay
    dstate = _dot(seen, a, cd, contract=(0, 0)) + ch.carry_decay * dstate
    dnormaliser = jnp.sum(seen * b, axis=0, keepdims=True) + ch.carry_decay * dnormaliser
    if wants_dw:
        dw = [dw[0] + _dot(dlogit, ch.xk, spec.compute_dtype, contract=(0, 0))]
    return [dk, dv], (dstate, dnormaliser, *dw)


def _bidirectional_keys(spec, k, valid, w, key_max):
    """Key features of a chunk stabilised by `key_max` `[1, 1]`; zero at invalid keys."""
    xk, proj_k = _project(spec, k, w)
    if spec.feature_map == "relu":
        return xk, proj_k, jnp.where(valid > 0, _relu_features(spec, proj_k), 0.0)
    logits = _softmax_logits(spec, xk, proj_k)
    return xk, proj_k, jnp.exp(jnp.where(valid > 0, logits - key_max, MASK_VALUE))


def _key_reduce_step(spec, values, whole, carry):
    k, v, valid = values
    (w,) = whole
    kv, normaliser, key_max = carry
    if spec.feature_map == "softmax":
        xk, proj_k = _project(spec, k, w)
        logits = _softmax_logits(spec, xk, proj_k)
        row_max = jnp.max(jnp.where(valid > 0, logits, MASK_VALUE), axis=1, keepdims=True)
        chunk_max = jnp.max(row_max, axis=0, keepdims=True)
        new_max = jnp.maximum(key_max, chunk_max)
        # What was summed so far is rescaled to the new maximum; the total equals
        # the features stabilised by the maximum over all keys.
        factor = jnp.exp(key_max - new_max)
        kf = jnp.exp(jnp.where(valid > 0, logits - new_max, MASK_VALUE))
        kv, normaliser, key_max = kv * factor, normaliser * factor, new_max
    else:
        _, _, kf = _bidirectional_keys(spec, k, valid, w, key_max)
    kv = kv + _dot(kf, v, spec.compute_dtype, contract=(0, 0))
    return [], (kv, normaliser + jnp.sum(kf, axis=0, keepdims=True), key_max)


def _bidirectional_queries(spec, q, w, kv, normaliser):
    xq, proj_q = _project(spec, q, w)
    if spec.feature_map == "softmax":
        qf = _query_features(spec, _softmax_logits(spec, xq, proj_q), normaliser)
    else:
        qf = _relu_features(spec, proj_q)
    num = _dot(qf, kv, spec.compute_dtype)
    return xq, proj_q, qf, num, jnp.sum(qf * normaliser, axis=1, keepdims=True)


def _query_apply_step(spec, values, whole, carry):
    q, valid = values
    w, kv, normaliser = whole
    _, _, _, num, den = _bidirectional_queries(spec, q, w, kv, normaliser)
    out, _ = _normalise(spec, num, den, valid)
    return [out], carry


def _query_grad_step(spec, wants_dw, values, whole, carry):
    q, g, valid = values
    w, kv, normaliser = whole
    dkv, dnormaliser, *dw = carry
    cd = spec.compute_dtype
    xq, proj_q, qf, num, den = _bidirectional_queries(spec, q, w, kv, normaliser)
    out, inv = _normalise(spec, num, den, valid)
    a, b, _ = _row_cotangents(spec, g, out, inv)
    dqf = _dot(a, kv, cd, contract=(1, 1)) + b * normaliser
    dq, dlogit = _input_grads(spec, dqf, qf, xq, proj_q, w)
    dkv = dkv + _dot(qf, a, cd, contract=(0, 0))
    dnormaliser = dnormaliser + jnp.sum(qf * b, axis=0, keepdims=True)
    if wants_dw:
        dw = [dw[0] + _dot(dlogit, xq, spec.compute_dtype, contract=(0, 0))]
    return [dq], (dkv, dnormaliser, *dw)


def _key_grad_step(spec, wants_dw, values, whole, carry):
    k, v, valid = values
    w, dkv, dnormaliser, key_max = whole
    cd = spec.compute_dtype
    xk, proj_k, kf = _bidirectional_keys(spec, k, valid, w, key_max)
    dv = _dot(kf, dkv, cd)
    dkf = _dot(v, dkv, cd, contract=(1, 1)) + dnormaliser
    dk, dlogit = _input_grads(spec, dkf, kf, xk, proj_k, w, mask=valid)
    if wants_dw:
        carry = (carry[0] + _dot(dlogit, xk, spec.compute_dtype, contract=(0, 0)),)
    return [dk, dv], carry
