"""Performer FAVOR+ attention: random projections and the XLA implementation.

softmax(QK^T)V is replaced by phi(Q) (phi(K)^T V), normalised by
phi(Q) (phi(K)^T 1), so cost is linear in sequence length.

Positive softmax features (FAVOR+): with x' = sqrt(scale) x and Gaussian rows
w_f, `exp(w_f . x' - |x'|^2 / 2)` has `E[phi(q) . phi(k)] = exp(scale q . k)`.
Each feature vector may be multiplied by any positive constant common to the
terms it is summed with, which cancels between numerator and denominator; the
stabilisers below choose those constants so exponentials never overflow:

* queries: `c_i = max_f (logit_if + log z_if)`, where z_i is the (stabilised)
  sum of the key features row i attends, so the largest terms of its
  denominator are about 1, and the gradient stays finite (`_query_features`);
* keys, bidirectional: the maximum over all valid keys;
* keys, causal: `M_i`, the running maximum over the keys at positions <= i.
  Key j is stored as `exp(logit_j - M_j)`, and query i rescales the terms it
  sums by `exp(M_j - M_i) <= 1`: within a chunk as a `[chunk, chunk]` factor on
  the masked feature product, across chunks through the carried state. No
  later position enters position i's computation, so changing the future
  cannot change the past, not even through underflow (Performer's reference
  implementation takes the key maximum over the whole sequence, which does).

Causal attention takes the chunked form of linear attention: within a chunk
the exact masked product of the features, across chunks a carried
`[features, head_dim + 1]` state `phi(K)^T [V, 1]` (the normaliser is its last
column). A scan step takes several chunks at once, so that chunks can be short
(the in-chunk products cost `seq * chunk * features`) while the scan takes few
steps. Features, states and sums are float32 (float64 for float64 inputs)
whatever the input dtype. Gradients are by autodiff with the stabilisers (which
cancel exactly) held constant, except through the carried states, whose
backward pass is written out (`_carried_products`).

Layout inside: `[batch, heads, seq, head_dim]`; projections `[features, head_dim]`
(shared by heads) or `[heads, features, head_dim]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.common import MASK_VALUE, RELU_EPSILON
from longjax.attention import arguments

SCALINGS = ("chi", "sqrt_d")
# Rows per scan step of the bidirectional passes (256 and 512 were within noise
# on CPU at seq 16384; 1024 was 40% slower).
BIDIRECTIONAL_CHUNK = 256
# Causal chunk length when the caller gives none, and rows per scan step of the
# causal pass (whole chunks, as many as fit). On a 2-core CPU, 256 features,
# head_dim 64, seq 16384, fwd+bwd: chunks of 32 beat 64 (whose in-chunk products
# cost twice as much) and 16 (more, smaller matmuls); steps of 64 rows beat 32
# and 128 by 2-8% and 256 by 10%.
DEFAULT_CHUNK_SIZE = 32
CAUSAL_STEP_ROWS = 64


def favor_projection(key, num_features: int, head_dim: int, *, orthogonal: bool = True, scaling: str = "chi"):
    """Random feature directions for FAVOR+.

    Args:
      key: a JAX PRNG key.
      num_features: m, the number of random features.
      head_dim: d.
      orthogonal: stack blocks of d orthogonal rows (QR of a Gaussian matrix;
        the last block truncated), instead of i.i.d. Gaussian rows.
      scaling: row norms: 'chi' draws them from the chi(d) distribution, the
        norms of Gaussian vectors (so each row is marginally Gaussian);
        'sqrt_d' sets them all to sqrt(d).

    Returns:
      float32 `[num_features, head_dim]`.
    """
    arguments.check_int(num_features, name="num_features")
    arguments.check_int(head_dim, name="head_dim")
    arguments.check_bool(orthogonal, name="orthogonal")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    direction_key, norm_key = jax.random.split(key)
    if orthogonal:
        num_blocks = -(-num_features // head_dim)
        gaussian = jax.random.normal(direction_key, (num_blocks, head_dim, head_dim), jnp.float32)
        # One QR per block, not one batched QR: XLA:CPU's batched LAPACK call waits on tasks it
        # queues on the pool it runs on, so several at once (a model's Performer layers each
        # drawing its projection in the train step) deadlock once they hold every thread.
        # Fixing the signs by R's diagonal makes each block Haar-distributed.
        blocks = []
        for g in gaussian:
            q_block, r_block = jnp.linalg.qr(g)
            blocks.append((q_block * jnp.sign(jnp.diagonal(r_block))[None, :]).T)
        directions = jnp.concatenate(blocks)[:num_features]
    else:
        gaussian = jax.random.normal(direction_key, (num_features, head_dim), jnp.float32)
        directions = gaussian / jnp.linalg.norm(gaussian, axis=-1, keepdims=True)
    if scaling == "chi":
        norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1)
    else:
        norms = jnp.full((num_features,), math.sqrt(head_dim), jnp.float32)
    return directions * norms[:, None]


def _project(x, projection):
    """`x W^T` for W `[features, d]` (shared) or `[heads, features, d]`: `[batch, heads, seq, features]`."""
    # A shared projection is one large matmul, about 2.5x faster on CPU than a per-head batched one.
    equation = "bhnd,md->bhnm" if projection.ndim == 2 else "bhnd,hmd->bhnm"
    return jnp.einsum(equation, x, projection.astype(x.dtype))


def feature_logits(x, projection, scale: float):
    """`w_f . x' - |x'|^2 / 2` with `x' = sqrt(scale) x`: `[batch, heads, seq, features]`."""
    x = x * math.sqrt(scale)
    proj = _project(x, projection)
    return proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def relu_features(x, projection, scale: float):
    """Generalised ReLU kernel features `relu(x' W^T) + eps`: `[batch, heads, seq, features]`."""
    return jax.nn.relu(_project(x * math.sqrt(scale), projection)) + RELU_EPSILON


def _key_logit_max(keys, valid, projection, scale):
    """Each valid key's largest logit (MASK_VALUE for invalid keys): `[chunks, batch, heads, chunk]`.

    A stabiliser, so it carries no gradient. Takes chunked keys and validity.
    """

    def step(_, xs):
        kc, valid_c = xs
        row_max = jnp.max(feature_logits(kc, projection, scale), axis=-1)
        return None, jnp.where(valid_c[:, None, :], row_max, MASK_VALUE)

    _, key_max = jax.lax.scan(step, None, (keys, valid))
    return jax.lax.stop_gradient(key_max)


def _chunk_key_features(kc, valid_c, stabiliser_c, projection, feature_map, scale):
    """Key features of one chunk `[batch, heads, chunk, features]`, zero at invalid keys.

    Softmax keys are `exp(logit - M)` with M the key stabiliser at each position
    (`[batch, heads, chunk]`); ReLU features need none.
    """
    if feature_map == "relu":
        return relu_features(kc, projection, scale) * valid_c[:, None, :, None]
    # Masking the exponent, not the result: an invalid key's exponent may be +huge
    # (no valid key yet sets the stabiliser), and exp(+huge) * 0 is NaN. Masked per key,
    # by the offset, so the gradient keeps no `[chunk, features]` mask.
    offset = jnp.where(valid_c[:, None, :], stabiliser_c, -MASK_VALUE)
    return jnp.exp(feature_logits(kc, projection, scale) - offset[..., None])


def _query_features(q_in, normaliser, feature_map):
    """Query features given each row's key normaliser `z` (`[.., rows, features]`).

    Softmax: `exp(logit_f - c_i)` with `c_i = max_f (logit_if + log z_if)` over
    the features whose key mass `z_if` is at least eps = sqrt(smallest normal)
    (about 1e-19 in float32). Some key feature has `z >= 1` (the one that set
    the key stabiliser), so the largest term of the denominator
    `sum_f phi_f(q_i) z_if` is exactly 1, and every query feature is at most
    1/eps: neither the output nor the backward pass's `phi(q) / den` products
    can overflow or underflow, however large the scores. Features whose key
    mass is below eps (key features at the edge of underflow, 19 orders below
    the largest) are left out; c_i uses only what row i attends.
    """
    if feature_map == "relu":
        return q_in
    usable = normaliser >= math.sqrt(jnp.finfo(normaliser.dtype).tiny)
    # Left out by a -inf offset rather than a select, so the gradient keeps no mask.
    offset = jnp.where(usable, 0.0, -jnp.inf).astype(q_in.dtype)
    shifted = q_in + jnp.log(jnp.where(usable, normaliser, 1.0)) + offset
    c = jax.lax.stop_gradient(jnp.max(shifted, axis=-1, keepdims=True))
    c = jnp.where(jnp.isfinite(c), c, 0.0)  # a row with no key: every feature unusable
    return jnp.exp(q_in - c + offset)


def _query_inputs(q, projection, feature_map, scale):
    """What `_query_features` needs: softmax logits, or the ReLU features themselves."""
    if feature_map == "relu":
        return relu_features(q, projection, scale)
    return feature_logits(q, projection, scale)


def _safe_divide(num, den):
    """num / den, and 0 where den is below the smallest normal number (no key):
    never NaN or Inf, in value or gradient."""
    ok = den >= jnp.finfo(den.dtype).tiny
    safe_den = jnp.where(ok, den, 1.0)  # before dividing: 0/0 poisons the gradient through where
    return jnp.where(ok[..., None], num / safe_den[..., None], 0.0)


def _to_chunks(x, chunk: int, mode: str = "constant"):
    """`[batch, heads, seq, ...]` -> `[chunks, batch, heads, chunk, ...]`, padding seq."""
    pad = -x.shape[2] % chunk
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), mode=mode)
    return jnp.moveaxis(x.reshape(x.shape[:2] + (-1, chunk) + x.shape[3:]), 2, 0)


def _from_chunks(x, seq: int):
    """Inverse of `_to_chunks`."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :seq]


def _key_sums(keys, values, valid, stabiliser, projection, feature_map, scale, combine):
    """`phi(K)^T V` `[batch, heads, features, head_dim]` and `phi(K)^T 1` `[batch, heads, features]`
    of chunked keys (`[chunks, batch, heads, chunk, ...]`), softmax features taken against one
    stabiliser per batch and head (`[batch, heads]`)."""
    b, h = keys.shape[1:3]

    def key_step(carry, xs):
        kv, normaliser = carry
        kc, vc, valid_c = xs
        kf = _chunk_key_features(kc, valid_c, stabiliser[..., None], projection, feature_map, scale)
        return (kv + jnp.einsum("bhnm,bhnd->bhmd", kf, vc), normaliser + jnp.sum(kf, axis=2)), None

    m, d = projection.shape[-2], values.shape[-1]
    init = (jnp.zeros((b, h, m, d), keys.dtype), jnp.zeros((b, h, m), keys.dtype))
    return jax.lax.scan(key_step, tuple(map(combine.own, init)), (keys, values, valid))[0]


class SequenceCombine:
    """How the FAVOR+ passes combine over the sequence: within one array (this class), or across
    the shards of a sequence-parallel mesh axis (`sequence_parallel.py`).

    `max` and `sum` take a stabiliser and the key sums of this sequence to those of the whole
    sequence; `before` gives a causal pass the state of the keys before this sequence.
    """

    def max(self, x):
        return x

    def sum(self, x):
        return x

    def own(self, x):
        """`x` as a value of this sequence's own (a shard's, under `shard_map`), e.g. a scan's initial carry."""
        return x

    def before(self, block_max, key_sums):
        """(state, normaliser, running max) of the keys before this sequence: none.

        block_max: `[batch, heads]`, the largest logit of this sequence's valid keys (stabiliser);
        key_sums: `stabiliser -> (kv, normaliser)`, this sequence's key sums against a stabiliser.
        """
        kv, normaliser = jax.eval_shape(key_sums, block_max)
        return (
            jnp.zeros(kv.shape, kv.dtype),
            jnp.zeros(normaliser.shape, normaliser.dtype),
            jnp.full(block_max.shape, MASK_VALUE, block_max.dtype),
        )


def _bidirectional(q, k, v, projection, key_valid, feature_map, scale, chunk, combine: SequenceCombine):
    """Scans over key chunks (reducing `phi(K)^T V` and the normaliser), then query chunks.

    Same algebra as one big product; computing features inside the scans keeps
    each step's `[chunk, features]` arrays in cache instead of materialising
    `[seq, features]` ones, which on CPU made fwd+bwd 1.8x faster at seq 16384
    and 2.3x at 32768 (and linear in seq).
    """
    b, h, n, d = q.shape
    valid = _to_chunks(key_valid[:, None, :], chunk)[:, :, 0]  # [chunks, batch, chunk]
    keys, values = _to_chunks(k, chunk), _to_chunks(v, chunk)

    if feature_map == "relu":
        key_max = jnp.zeros((b, h), q.dtype)
    else:
        key_max = combine.max(jnp.max(_key_logit_max(keys, valid, projection, scale), axis=(0, 3)))

    kv, normaliser = _key_sums(keys, values, valid, key_max, projection, feature_map, scale, combine)
    kv, normaliser = combine.sum(kv), combine.sum(normaliser)
    normaliser = normaliser[:, :, None, :]

    def query_step(_, qc):
        qf = _query_features(_query_inputs(qc, projection, feature_map, scale), normaliser, feature_map)
        num = jnp.einsum("bhnm,bhmd->bhnd", qf, kv)
        return None, _safe_divide(num, jnp.sum(qf * normaliser, axis=-1))

    _, out = jax.lax.scan(query_step, None, _to_chunks(q, chunk))
    return _from_chunks(out, n)


@jax.custom_vjp
def _carried_products(qf, kf, vf, state, decays):
    """`phi(q_i) E_g` for the rows of each chunk g, and the state leaving the step, `E_group`.

    qf, kf: `[batch, heads, group, chunk, features]`; vf: `[batch, heads, group, chunk, cols]`;
    state `E_0`: `[batch, heads, features, cols]`; decays: `[batch, heads, group]`, with
    `E_(g+1) = decays_g E_g + phi(K_g)^T vf_g`. Returns `[batch, heads, group, chunk, cols]` and
    `E_group`. The backward pass is written out: autodiff of the chain made XLA accumulate the
    states' cotangents slowly on CPU, and saved a state per chunk where recomputing them costs
    one matmul. The decays are stabiliser ratios, held constant.
    """
    return _carried_products_fwd(qf, kf, vf, state, decays)[0]


def _entering_states(kf, vf, state, decays):
    """`[E_0, .., E_group]` of `_carried_products`."""
    own_kv = [jnp.einsum("bhcm,bhcd->bhmd", kf[:, :, g], vf[:, :, g]) for g in range(kf.shape[2])]
    entering = [state]
    for g, kv in enumerate(own_kv):
        entering.append(entering[-1] * decays[:, :, g, None, None] + kv)
    return entering


def _carried_products_fwd(qf, kf, vf, state, decays):
    entering = _entering_states(kf, vf, state, decays)
    num = jnp.stack([jnp.einsum("bhcm,bhmd->bhcd", qf[:, :, g], e) for g, e in enumerate(entering[:-1])], axis=2)
    return (num, entering[-1]), (qf, kf, vf, state, decays)


def _carried_products_bwd(residuals, cotangents):
    qf, kf, vf, state, decays = residuals
    d_num, d_state = cotangents
    entering = _entering_states(kf, vf, state, decays)
    d_qf, d_kf, d_vf = [], [], []
    for g in reversed(range(qf.shape[2])):
        # d_state is the cotangent of E_(g+1), which is also that of chunk g's own sums.
        d_kf.append(jnp.einsum("bhcd,bhmd->bhcm", vf[:, :, g], d_state))
        d_vf.append(jnp.einsum("bhcm,bhmd->bhcd", kf[:, :, g], d_state))
        d_qf.append(jnp.einsum("bhcd,bhmd->bhcm", d_num[:, :, g], entering[g]))
        d_state = d_state * decays[:, :, g, None, None] + jnp.einsum("bhcm,bhcd->bhmd", qf[:, :, g], d_num[:, :, g])
    stack = lambda xs: jnp.stack(xs[::-1], axis=2)
    return stack(d_qf), stack(d_kf), stack(d_vf), d_state, jnp.zeros_like(decays)


_carried_products.defvjp(_carried_products_fwd, _carried_products_bwd)


def _row_normalisers(kf, normaliser, to_end, decays, decay, rescale):
    """Each row's key mass `z_i` `[batch, heads, group, chunk, features]` (in `_causal`'s step),
    for the query stabiliser only: no gradient. `normaliser`: that of the carried state."""
    kf = jax.lax.stop_gradient(kf)
    own = jnp.einsum("bhgc,bhgcm->bhgm", to_end, kf)
    entering = [normaliser]
    for g in range(kf.shape[2] - 1):
        entering.append(entering[-1] * decays[:, :, g, None] + own[:, :, g])
    entering = jnp.stack(entering, axis=2)[..., None, :]
    return jax.lax.stop_gradient(decay[..., None] * entering + jnp.einsum("bhgij,bhgjm->bhgim", rescale, kf))


def _causal(q, k, v, projection, key_valid, feature_map, scale, chunk, combine: SequenceCombine):
    """Causal FAVOR+ on `[batch, heads, seq, head_dim]`, `CAUSAL_STEP_ROWS // chunk` chunks per scan step.

    Each step computes its chunks' features and in-chunk products batched over the chunks;
    only the states entering them are sequential (`_carried_products`).
    """
    b, h, n, d = q.shape
    chunk = min(chunk, n)
    group = max(1, min(CAUSAL_STEP_ROWS // chunk, -(-n // chunk)))
    rows = group * chunk
    valid = _to_chunks(key_valid[:, None, :], rows)[:, :, 0]  # [steps, batch, rows]
    keys, values = _to_chunks(k, rows), _to_chunks(v, rows)
    if feature_map == "relu":
        position_max = combine.own(jnp.zeros((b, h, n), q.dtype))
        block_max = combine.own(jnp.zeros((b, h), q.dtype))
    else:
        position_max = _from_chunks(_key_logit_max(keys, valid, projection, scale), n)
        block_max = jnp.max(position_max, axis=2)
    key_sums = lambda stabiliser: _key_sums(keys, values, valid, stabiliser, projection, feature_map, scale, combine)
    init = combine.before(block_max, key_sums)
    if feature_map == "relu":
        running_max = position_max
    else:
        # The running max over valid keys up to each position: no later key enters.
        running_max = jax.lax.cummax(jnp.maximum(position_max, init[2][..., None]), axis=2)

    in_chunk = np.tril(np.ones((chunk, chunk), bool))
    by_chunk = lambda x: x.reshape(x.shape[:2] + (group, chunk) + x.shape[3:])

    def step(carry, xs):
        state, prev_max = carry
        qc, kc, vc, valid_c, mc = xs
        logits = by_chunk(_query_inputs(qc, projection, feature_map, scale))  # [b, h, g, c, m]
        kf = by_chunk(_chunk_key_features(kc, valid_c, mc, projection, feature_map, scale))
        vc, mc = by_chunk(vc), by_chunk(mc)
        # Values as [V, 1]: the normaliser is one more column of every product with them, so
        # no sum over rows or features is left (reductions were slow on CPU, matmuls are not).
        vc = jnp.concatenate([vc, jnp.ones(vc.shape[:-1] + (1,), vc.dtype)], axis=-1)
        # Every sum is kept relative to the running max where it ends: a chunk's at its last
        # row, the carried state at prev_max. Moving one to a later point scales it by
        # exp(earlier max - later max) <= 1.
        ends = mc[..., -1]  # [b, h, g]
        starts = jnp.concatenate([prev_max[..., None], ends], axis=-1)  # chunk starts, then the step's end
        to_end = jnp.exp(mc - ends[..., None])  # [b, h, g, c]
        decays = jnp.exp(starts[..., :-1] - starts[..., 1:])  # [b, h, g]: each chunk's start to its end
        # Row i of chunk g rescales its chunk's entering state by exp(start_g - M_i) and key j
        # of its own chunk by exp(M_j - M_i); both <= 1.
        decay = jnp.exp(starts[..., :group, None] - mc)  # [b, h, g, c]
        rescale = jnp.where(in_chunk, jnp.exp(jnp.minimum(mc[..., None, :] - mc[..., :, None], 0.0)), 0.0)
        if feature_map == "relu":
            qf = logits
        else:
            row_normaliser = _row_normalisers(kf, state[..., -1], to_end, decays, decay, rescale)
            qf = _query_features(logits, row_normaliser, feature_map)
        scores = jnp.einsum("bhgim,bhgjm->bhgij", qf, kf) * rescale
        carried, state = _carried_products(qf, kf, vc * to_end[..., None], state, decays)
        both = carried * decay[..., None] + jnp.einsum("bhgij,bhgjd->bhgid", scores, vc)
        out = _safe_divide(both[..., :-1], both[..., -1]).reshape(both.shape[:2] + (rows, d))
        return (state, starts[..., group]), out

    # Padded positions hold no key; repeating the last running max keeps every decay <= 1.
    xs = (_to_chunks(q, rows), keys, values, valid, _to_chunks(running_max, rows, mode="edge"))
    state, normaliser, max_before = init
    _, out = jax.lax.scan(step, (jnp.concatenate([state, normaliser[..., None]], axis=-1), max_before), xs)
    return _from_chunks(out, n)


def favor_xla(q, k, v, *, projection, feature_map, causal, padding_mask, scale, chunk_size, combine=None):
    """FAVOR+ in pure JAX; arguments as `longjax.attention.favor_attention`.

    `projection` is `[features, head_dim]` (shared) or `[heads, features, head_dim]`.
    `combine`: a `SequenceCombine` when q, k, v are one shard of a longer sequence.
    """
    combine = SequenceCombine() if combine is None else combine
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Features, states and sums in float32 at least (float64 inputs stay float64).
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    to_bhnd = lambda x: jnp.swapaxes(x, 1, 2).astype(compute_dtype)
    qh, kh, vh = to_bhnd(q), to_bhnd(k), to_bhnd(v)
    key_valid = jnp.ones(q.shape[:2], bool) if padding_mask is None else padding_mask
    if causal:
        out = _causal(
            qh, kh, vh, projection, key_valid, feature_map, scale, chunk_size or DEFAULT_CHUNK_SIZE, combine
        )
    else:
        chunk = min(BIDIRECTIONAL_CHUNK, q.shape[1])
        out = _bidirectional(qh, kh, vh, projection, key_valid, feature_map, scale, chunk, combine)
    out = to_bhnd(out)
    if padding_mask is not None:
        out = jnp.where(padding_mask[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)
