"""The decoder's attention layers: causal self-attention with a key/value cache, and cross-attention.

Both are dense: the decoder's sequences (summaries, a few hundred tokens) are
short, and cross-attention reads every encoder position. What makes them fit
long inputs is that cross-attention's keys and values are computed once per
source (`CrossAttention.key_value`) and shared by all the beams decoding that
source: queries of the `beams` hypotheses of one source are folded into its
query axis, so the `[batch, source, heads, head_dim]` keys are never tiled.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.models.config import TransformerConfig

_MASKED = -1e30  # finite, so a fully masked row cannot make NaN


def _projection(cfg: TransformerConfig, name: str) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        (cfg.num_heads, cfg.head_dim), dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name
    )


def _output(cfg: TransformerConfig) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name="out"
    )


def masked_attention(q, k, v, mask, scale: float):
    """Softmax attention in float32 with a boolean mask.

    Args:
      q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, k_len, heads, head_dim]`.
      mask: bool broadcastable to `[batch, heads, q_len, k_len]`, True where a query may attend.
      scale: score multiplier.

    Returns:
      `[batch, q_len, heads, head_dim]` in q's dtype.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v).astype(q.dtype)


class CausalSelfAttention(nn.Module):
    """Causal dense self-attention; with `decode=True`, incremental over a key/value cache.

    The cache lives in the 'cache' collection, as in
    `flax.linen.MultiHeadDotProductAttention(decode=True)`: initialise it by
    calling the model with `decode=True` on `[batch, max_length]` tokens
    (which sizes `cached_key`/`cached_value` and leaves them empty), then feed
    `[batch, n]` tokens per call with `mutable=['cache']`; each call appends
    its keys at `cache_index` and attends to every cached position up to it.
    """

    config: TransformerConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x):
        """x: `[batch, seq, d_model]` -> `[batch, seq, d_model]` in the computation dtype."""
        cfg = self.config
        x = x.astype(cfg.compute_dtype)
        q, k, v = (_projection(cfg, name)(x) for name in ("query", "key", "value"))
        scale = float(cfg.head_dim) ** -0.5
        seq = x.shape[1]
        if not self.decode:
            mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
            return _output(cfg)(masked_attention(q, k, v, mask, scale))
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:
            # The initialising call only sizes the cache: [batch, max_length, heads, head_dim].
            return _output(cfg)(jnp.zeros_like(q))
        capacity = cached_key.value.shape[1]
        start = index.value
        keys = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype), (0, start, 0, 0))
        cached_key.value, cached_value.value, index.value = keys, values, start + seq
        query_positions = start + jnp.arange(seq)
        mask = (jnp.arange(capacity)[None, :] <= query_positions[:, None])[None, None]
        return _output(cfg)(masked_attention(q, keys, values, mask, scale))


class CrossAttention(nn.Module):
    """Dense attention from decoder positions to the encoder's.

    `key_value(encoded)` projects the encoder output once; `__call__` attends
    decoder states of `batch * beams` hypotheses to the keys of their `batch`
    sources (hypothesis `i` decodes source `i // beams`).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.query = _projection(cfg, "query")
        self.key = _projection(cfg, "key")
        self.value = _projection(cfg, "value")
        self.out = _output(cfg)

    def key_value(self, encoded):
        """encoded: `[batch, source, d_model]` -> (keys, values), each `[batch, source, heads, head_dim]`."""
        encoded = encoded.astype(self.config.compute_dtype)
        return self.key(encoded), self.value(encoded)

    def __call__(self, x, keys, values, source_mask):
        """Attends `x` to the encoded source.

        Args:
          x: `[batch * beams, seq, d_model]`.
          keys, values: `[batch, source, heads, head_dim]` from `key_value`.
          source_mask: optional bool `[batch, source]`, True for real source tokens.

        Returns:
          `[batch * beams, seq, d_model]` in the computation dtype.
        """
        cfg = self.config
        hypotheses, seq, _ = x.shape
        batch = keys.shape[0]
        if hypotheses % batch:
            raise ValueError(f"{hypotheses} decoder rows cannot share the keys of {batch} sources")
        beams = hypotheses // batch
        q = self.query(x.astype(cfg.compute_dtype))
        # Fold each source's beams into its query axis: queries attend independently, so this is exact.
        q = q.reshape(batch, beams * seq, cfg.num_heads, cfg.head_dim)
        mask = jnp.ones((1, 1, 1, 1), bool) if source_mask is None else source_mask[:, None, None, :]
        out = masked_attention(q, keys, values, mask, float(cfg.head_dim) ** -0.5)
        return self.out(out.reshape(hypotheses, seq, cfg.num_heads, cfg.head_dim))
