"""The FAVOR+ kernel bodies: what each pass of `favor.py` computes for one chunk of one (batch, head).

Each public `*_step(spec, ..., ins, outs)` is the step function of one
`favor_passes` pass: it reads its refs (one chunk of each row operand, the
chunk's entry of each per-chunk operand, each whole operand) and writes the
chunk's outputs. `spec` is `favor._Spec`, the call's static description. The
numerical contract, the passes and the scans between them are described in
`favor.py`.

The features are walked in tiles of `spec.feature_tile` columns, so a program
holds a `[feature_tile, head_dim]` slice of the projection and of a state at a
time, never the whole `[features, head_dim]` (128 KB each in float32 at
head_dim 128 with 256 features). What needs every feature of a row, the key
maxima and the query stabilisers, is a reduction over the tiles first; the
tiles' features are then recomputed where they are used.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.common import MASK_VALUE, RELU_EPSILON


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


def causal_forward_step(spec, ins, outs):
    q_ref, k_ref, v_ref, valid_ref, key_max_ref, state_ref, z_ref, max_ref, w_ref = ins
    (o_ref,) = outs
    valid = valid_ref[...]
    ch = _causal_chunk(spec, q_ref, k_ref, valid, key_max_ref[...], w_ref, z_ref, max_ref[...])
    carried, scores, den = _causal_products(spec, ch, w_ref, z_ref, state_ref)
    out, _ = _normalise(spec, carried + _dot(scores, v_ref[...], spec.compute_dtype), den, valid)
    o_ref[...] = out.astype(o_ref.dtype)


def causal_rows_step(spec, ins, outs):
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


def causal_dq_step(spec, wants_dw, ins, outs):
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


def causal_dkv_step(spec, wants_dw, ins, outs):
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


def chunk_state_step(spec, ins, outs):
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


def query_apply_step(spec, ins, outs):
    q_ref, valid_ref, w_ref, kv_ref, z_ref = ins
    (o_ref,) = outs
    num, den, _ = _bidirectional_products(spec, _rows(spec, q_ref), w_ref, kv_ref, z_ref)
    out, _ = _normalise(spec, num, den, valid_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)


def query_grad_step(spec, wants_dw, ins, outs):
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


def key_grad_step(spec, wants_dw, ins, outs):
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
