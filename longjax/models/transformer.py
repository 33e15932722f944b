"""Transformer blocks (pre- or post-LayerNorm) and the block stack shared by the models."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from longjax.models.attention import MultiHeadAttention
from longjax.models.config import TransformerConfig

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def layer_norm(config: TransformerConfig, name: str) -> nn.LayerNorm:
    """LayerNorm computing in float32 whatever the computation dtype."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=jnp.float32,
        param_dtype=config.parameter_dtype,
        name=name,
    )


class MLP(nn.Module):
    """Position-wise feed-forward: Dense(d_ff), activation, dropout, Dense(d_model).

    The dropout after the activation is `config.activation_dropout` (BART's
    name; None means `config.dropout`).
    """

    config: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        """x: `[..., d_model]`; `deterministic` overrides the attribute (for modules built in `setup`)."""
        cfg = self.config
        deterministic = self.deterministic if deterministic is None else deterministic
        dense = functools.partial(nn.Dense, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype)
        h = _ACTIVATIONS[cfg.activation](dense(cfg.d_ff, name="wi")(x))
        rate = cfg.dropout if cfg.activation_dropout is None else cfg.activation_dropout
        h = nn.Dropout(rate=rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, name="wo")(h)


def keep_sequence_sharded(config: TransformerConfig, x):
    """`x` `[batch, seq, ...]` held sharded along seq over `config.sequence_axis` (when set): the
    residual stream and the position-wise layers stay split like the attention's shards, the
    batch axis left to the compiler."""
    if config.sequence_axis is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(PartitionSpec.UNCONSTRAINED, config.sequence_axis))


class TransformerBlock(nn.Module):
    """Attention and MLP sublayers with residuals, dropout and LayerNorm.

    'pre':  x + drop(attn(LN(x))), then x + drop(mlp(LN(x))).
    'post': LN(x + drop(attn(x))), then LN(x + drop(mlp(x)))  (BERT/RoBERTa).
    The residual stream stays float32; sublayers compute in the model dtype.
    """

    config: TransformerConfig
    layer: int
    causal: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, padding_mask, global_mask, step):
        cfg = self.config
        attention = MultiHeadAttention(
            cfg, self.layer, self.causal, self.deterministic, name="attention"
        )
        mlp = MLP(cfg, self.deterministic, name="mlp")
        dropout = nn.Dropout(rate=cfg.dropout)
        x = keep_sequence_sharded(cfg, x.astype(jnp.float32))

        def attend(h):
            return attention(h, padding_mask=padding_mask, global_mask=global_mask, step=step)

        if cfg.layer_norm == "pre":
            x = x + dropout(attend(layer_norm(cfg, "attention_norm")(x)), deterministic=self.deterministic)
            x = x + dropout(mlp(layer_norm(cfg, "mlp_norm")(x)), deterministic=self.deterministic)
            return keep_sequence_sharded(cfg, x)
        x = layer_norm(cfg, "attention_norm")(
            x + dropout(attend(x), deterministic=self.deterministic)
        )
        return keep_sequence_sharded(
            cfg, layer_norm(cfg, "mlp_norm")(x + dropout(mlp(x), deterministic=self.deterministic))
        )


class TransformerStack(nn.Module):
    """`num_layers` blocks (rematerialised when `config.remat`), then the final LayerNorm of pre-LN models.

    Returns float32 `[batch, seq, d_model]`.
    """

    config: TransformerConfig
    causal: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, *, padding_mask=None, global_mask=None, step=None):
        cfg = self.config
        block = nn.remat(TransformerBlock) if cfg.remat else TransformerBlock
        for layer in range(cfg.num_layers):
            x = block(cfg, layer, self.causal, self.deterministic, name=f"layer_{layer}")(
                x, padding_mask, global_mask, step
            )
        if cfg.layer_norm == "pre":
            x = layer_norm(cfg, "final_norm")(x)
        return x.astype(jnp.float32)
