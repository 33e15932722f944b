"""The character (byte-level) language model of the Longformer paper."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from longjax.models import positions as positions_lib
from longjax.models.config import TransformerConfig
from longjax.models.transformer import TransformerStack


class CharLM(nn.Module):
    """Causal transformer LM over a byte or character vocabulary.

    Token embeddings (initialised N(0, 0.02)) are scaled by sqrt(d_model) as in
    Transformer-XL; the
    layers take their attention configs from `config.attention` (one per
    layer), so window sizes and dilation may differ per layer.

    Attributes:
      config: the model config (`position` usually 'txl_relative').
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, step=None, padding_mask=None):
        """Next-token logits.

        Args:
          tokens: int `[batch, seq]`, values in `[0, vocab_size)`.
          deterministic: disables dropout; when False, apply needs a 'dropout' rng.
          step: training step (int scalar), for Performer layers that redraw
            their projection.
          padding_mask: optional bool `[batch, seq]`, True for real tokens.

        Returns:
          float32 `[batch, seq, vocab_size]`: logits of token t+1 at position t.
        """
        cfg = self.config
        x = nn.Embed(
            cfg.vocab_size, cfg.d_model, param_dtype=cfg.parameter_dtype,
            embedding_init=nn.initializers.normal(0.02), name="embed",
        )(tokens).astype(jnp.float32) * (cfg.d_model ** 0.5)
        if cfg.position == "learned":
            if tokens.shape[1] > cfg.max_positions:
                raise ValueError(
                    f"tokens has {tokens.shape[1]} positions but model.max_positions is {cfg.max_positions}"
                )
            x = x + nn.Embed(
                cfg.max_positions, cfg.d_model, param_dtype=cfg.parameter_dtype, name="position_embed"
            )(jnp.arange(tokens.shape[1]))[None]
        elif cfg.position == "sinusoidal":
            x = x + positions_lib.absolute_sinusoid(jnp.arange(tokens.shape[1]), cfg.d_model)[None]
        x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
        x = TransformerStack(cfg, causal=True, deterministic=deterministic, name="transformer")(
            x, padding_mask=padding_mask, step=step
        )
        return nn.Dense(cfg.vocab_size, dtype=jnp.float32, param_dtype=cfg.parameter_dtype, name="logits")(x)
