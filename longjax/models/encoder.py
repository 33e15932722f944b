"""A RoBERTa-shaped bidirectional encoder with any attention pattern."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from longjax.models import positions as positions_lib
from longjax.models.config import TransformerConfig
from longjax.models.transformer import TransformerStack, layer_norm


class LongEncoder(nn.Module):
    """Bidirectional encoder: RoBERTa's embeddings and blocks, a long-range attention pattern.

    With `position='learned'`, `position_offset=1`, `type_vocab_size=1`,
    `layer_norm='post'` and full attention it has RoBERTa's structure, so
    RoBERTa weights map onto it one to one (Longformer's conversion then copies
    the position table to cover longer inputs and the local projections into
    the global ones, see `copy_local_to_global`).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self, tokens, *, padding_mask=None, global_mask=None, token_type_ids=None, position_ids=None,
        deterministic: bool = True, step=None,
    ):
        """Contextual token representations.

        Args:
          tokens: int `[batch, seq]`.
          padding_mask: optional bool `[batch, seq]`, True for real tokens
            (None: all real). Padded positions output zeros from attention and
            take RoBERTa's padding position.
          global_mask: optional bool `[batch, seq]`, True for tokens with
            global attention (e.g. the question tokens in QA, [CLS] in classification).
          token_type_ids: optional int `[batch, seq]` (needs type_vocab_size > 0).
          position_ids: optional int `[batch, seq]` rows of the learned
            position table (None: RoBERTa's, from padding_mask). Hugging Face
            computes them from `input_ids != pad_token_id` even when the
            attention mask says otherwise; its wrappers pass them here.
          deterministic: disables dropout; when False, apply needs a 'dropout' rng.
          step: training step, for Performer layers that redraw their projection.

        Returns:
          float32 `[batch, seq, d_model]`.
        """
        cfg = self.config
        batch, seq = tokens.shape
        embed = lambda n, name: nn.Embed(n, cfg.d_model, param_dtype=cfg.parameter_dtype, name=name)
        x = embed(cfg.vocab_size, "embed")(tokens).astype(jnp.float32)
        if cfg.position == "learned":
            if position_ids is None:
                real = jnp.ones((batch, seq), bool) if padding_mask is None else padding_mask
                position_ids = positions_lib.roberta_position_ids(real, cfg.position_offset)
            if seq + cfg.position_offset >= cfg.max_positions:
                raise ValueError(
                    f"tokens has {seq} positions; model.max_positions ({cfg.max_positions}) must exceed "
                    f"seq + model.position_offset ({seq + cfg.position_offset})"
                )
            x = x + embed(cfg.max_positions, "position_embed")(position_ids)
        elif position_ids is not None:
            raise ValueError(f"position_ids given but model.position is {cfg.position!r}, not 'learned'")
        elif cfg.position == "sinusoidal":
            x = x + positions_lib.absolute_sinusoid(jnp.arange(seq), cfg.d_model)[None]
        if cfg.type_vocab_size:
            types = jnp.zeros((batch, seq), jnp.int32) if token_type_ids is None else token_type_ids
            x = x + embed(cfg.type_vocab_size, "token_type_embed")(types)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but model.type_vocab_size is 0")
        if cfg.layer_norm == "post":
            x = layer_norm(cfg, "embed_norm")(x)
        x = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
        return TransformerStack(cfg, causal=False, deterministic=deterministic, name="transformer")(
            x, padding_mask=padding_mask, global_mask=global_mask, step=step
        )
