"""LED: a long encoder and a BART-shaped decoder, for summarising long documents.

The encoder is any attention pattern of the library (LED's is Longformer's
sliding window with global tokens); the decoder is BART's: learned positions,
post-LayerNorm blocks of causal self-attention, cross-attention to the
encoder and an MLP, `layernorm_embedding`, word embeddings tied between the
encoder, the decoder and the output projection, plus `final_logits_bias`.

Parameters: 'shared' (word embeddings), 'final_logits_bias', 'encoder'
({position_embed, embed_norm, transformer/layer_i/...} as in LongEncoder),
'decoder' ({position_embed, embed_norm, layers_i/{self_attention,
self_attention_norm, cross_attention, cross_attention_norm, mlp, mlp_norm}}).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from longjax.models.config import FullAttention, TransformerConfig
from longjax.models.decoder_attention import CausalSelfAttention, CrossAttention
from longjax.models.transformer import MLP, TransformerStack, layer_norm


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
    """Hyper-parameters of a LongEncoderDecoder.

    Attributes:
      encoder: the encoder's TransformerConfig (`position='learned'`;
        `max_positions` usable positions; any attention pattern).
      decoder: the decoder's (full attention; `max_positions` usable positions).
        Vocabulary, d_model, dtypes, activation and LayerNorm placement must
        match the encoder's.
      position_offset: leading rows of both position tables that position 0
        skips (BART's learned positions start at row 2; LED's at row 0).
      scale_embedding: multiply word embeddings by sqrt(d_model) (BART's
        `scale_embedding`; false for bart-base/large and LED).
    """

    encoder: TransformerConfig
    decoder: TransformerConfig
    position_offset: int = 0
    scale_embedding: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "dtype", "param_dtype", "layer_norm"):
            enc, dec = getattr(self.encoder, name), getattr(self.decoder, name)
            if enc != dec:
                raise ValueError(f"model.decoder.{name} ({dec!r}) must equal model.encoder.{name} ({enc!r})")
        for part in ("encoder", "decoder"):
            if getattr(self, part).position != "learned":
                raise ValueError(f"model.{part}.position must be 'learned', got {getattr(self, part).position!r}")
        if not all(isinstance(a, FullAttention) for a in self.decoder.attention):
            raise ValueError("model.decoder.attention must be full attention in every layer")
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            raise ValueError(f"model.position_offset must be a non-negative int, got {self.position_offset!r}")

    @property
    def embed_scale(self) -> float:
        return float(self.encoder.d_model) ** 0.5 if self.scale_embedding else 1.0


def _embed(cfg: TransformerConfig, rows: int, name: str) -> nn.Embed:
    return nn.Embed(rows, cfg.d_model, param_dtype=cfg.parameter_dtype, name=name)


class Seq2SeqEncoder(nn.Module):
    """Word and position embeddings, `layernorm_embedding`, dropout, then the encoder stack."""

    config: EncoderDecoderConfig
    shared: nn.Embed

    @nn.compact
    def __call__(self, tokens, padding_mask, global_mask, deterministic):
        cfg = self.config
        enc = cfg.encoder
        seq = tokens.shape[1]
        if seq > enc.max_positions:
            raise ValueError(f"tokens has {seq} positions, over the encoder's {enc.max_positions} (model.encoder.max_positions)")
        x = self.shared(tokens).astype(jnp.float32) * cfg.embed_scale
        positions = _embed(enc, enc.max_positions + cfg.position_offset, "position_embed")
        x = x + positions(jnp.arange(seq) + cfg.position_offset)[None]
        if enc.layer_norm == "post":
            x = layer_norm(enc, "embed_norm")(x)
        x = nn.Dropout(rate=enc.dropout)(x, deterministic=deterministic)
        return TransformerStack(enc, causal=False, deterministic=deterministic, name="transformer")(
            x, padding_mask=padding_mask, global_mask=global_mask
        )


class DecoderBlock(nn.Module):
    """BART's decoder layer: self-attention, cross-attention and MLP sublayers (post- or pre-LayerNorm)."""

    config: TransformerConfig
    decode: bool = False

    def setup(self):
        cfg = self.config
        self.self_attention = CausalSelfAttention(cfg, decode=self.decode)
        self.cross_attention = CrossAttention(cfg)
        self.self_attention_norm = layer_norm(cfg, "self_attention_norm")
        self.cross_attention_norm = layer_norm(cfg, "cross_attention_norm")
        self.mlp = MLP(cfg)
        self.mlp_norm = layer_norm(cfg, "mlp_norm")
        self.dropout = nn.Dropout(rate=cfg.dropout)

    def cross_key_value(self, encoded):
        return self.cross_attention.key_value(encoded)

    def __call__(self, x, keys, values, source_mask, deterministic):
        cfg = self.config
        sublayers = (
            (lambda h: self.self_attention(h), self.self_attention_norm),
            (lambda h: self.cross_attention(h, keys, values, source_mask), self.cross_attention_norm),
            (lambda h: self.mlp(h, deterministic), self.mlp_norm),
        )
        x = x.astype(jnp.float32)
        for sublayer, norm in sublayers:
            if cfg.layer_norm == "pre":
                x = x + self.dropout(sublayer(norm(x)), deterministic=deterministic)
            else:
                x = norm(x + self.dropout(sublayer(x), deterministic=deterministic))
        return x


class Seq2SeqDecoder(nn.Module):
    """Word and position embeddings, `layernorm_embedding`, dropout, the decoder blocks."""

    config: EncoderDecoderConfig
    shared: nn.Embed
    decode: bool = False

    def setup(self):
        cfg = self.config
        dec = cfg.decoder
        block = nn.remat(DecoderBlock, static_argnums=(5,)) if dec.remat and not self.decode else DecoderBlock
        self.layers = [block(dec, self.decode) for _ in range(dec.num_layers)]
        self.position_embed = _embed(dec, dec.max_positions + cfg.position_offset, "position_embed")
        self.embed_norm = layer_norm(dec, "embed_norm")
        self.final_norm = layer_norm(dec, "final_norm") if dec.layer_norm == "pre" else None
        self.dropout = nn.Dropout(rate=dec.dropout)
        if self.decode:
            # False on the call that sizes the cache, which must not advance it.
            self.cache_ready = self.has_variable("cache", "position")
            self.position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))

    def cross_key_values(self, encoded):
        return tuple(layer.cross_key_value(encoded) for layer in self.layers)

    def __call__(self, tokens, cross, source_mask, deterministic):
        cfg = self.config
        dec = cfg.decoder
        seq = tokens.shape[1]
        start = 0
        if self.decode:
            if self.cache_ready:
                start = self.position.value
                self.position.value = start + seq
        elif seq > dec.max_positions:
            raise ValueError(f"decoder tokens have {seq} positions, over model.decoder.max_positions ({dec.max_positions})")
        x = self.shared(tokens).astype(jnp.float32) * cfg.embed_scale
        x = x + self.position_embed(start + jnp.arange(seq) + cfg.position_offset)[None]
        if dec.layer_norm == "post":
            x = self.embed_norm(x)
        x = self.dropout(x, deterministic=deterministic)
        for layer, (keys, values) in zip(self.layers, cross):
            x = layer(x, keys, values, source_mask, deterministic)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x.astype(jnp.float32)


class LongEncoderDecoder(nn.Module):
    """LED / BART: `encode` once per source, `cross_key_values` once, then `decode` (teacher-forced or cached).

    Attributes:
      config: the EncoderDecoderConfig.
      decode: the decoder's self-attention keeps a key/value cache (see
        `CausalSelfAttention`); used by generation.
    """

    config: EncoderDecoderConfig
    decode: bool = False

    def setup(self):
        cfg = self.config
        self.shared = _embed(cfg.encoder, cfg.encoder.vocab_size, "shared")
        self.encoder = Seq2SeqEncoder(cfg, self.shared)
        self.decoder = Seq2SeqDecoder(cfg, self.shared, decode=self.decode)
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (cfg.encoder.vocab_size,), cfg.encoder.parameter_dtype
        )

    def encode(self, tokens, *, padding_mask=None, global_mask=None, deterministic: bool = True):
        """The encoder's output.

        Args:
          tokens: int `[batch, source]`.
          padding_mask: optional bool `[batch, source]`, True for real tokens.
          global_mask: optional bool `[batch, source]`, True for tokens with
            global attention (LED puts it on the first `<s>`); needs
            `max_global_tokens` in the encoder's attention config under jit.
          deterministic: disables dropout; when False, apply needs a 'dropout' rng.

        Returns:
          float32 `[batch, source, d_model]`.
        """
        return self.encoder(tokens, padding_mask, global_mask, deterministic)

    def cross_key_values(self, encoded):
        """Each decoder layer's cross-attention (keys, values), `[batch, source, heads, head_dim]` each, computed once."""
        return self.decoder.cross_key_values(encoded)

    def decoder_hidden(self, decoder_tokens, cross, *, source_mask=None, deterministic: bool = True):
        """The decoder's output for `[batch * beams, target]` tokens: float32 `[batch * beams, target, d_model]`.

        `cross` comes from `cross_key_values` of `batch` sources; `source_mask`
        is the encoder's padding mask `[batch, source]`. With `decode=True`,
        the tokens continue the cached prefix (apply with `mutable=['cache']`).
        """
        return self.decoder(decoder_tokens, cross, source_mask, deterministic)

    def logits(self, hidden):
        """Tied output projection plus `final_logits_bias`: float32 `[..., vocab]`."""
        dtype = self.config.encoder.compute_dtype
        logits = jnp.einsum("...d,vd->...v", hidden.astype(dtype), self.shared.embedding.astype(dtype))
        return logits.astype(jnp.float32) + self.final_logits_bias.astype(jnp.float32)

    def __call__(self, tokens, decoder_tokens, *, padding_mask=None, global_mask=None, deterministic: bool = True):
        """Teacher-forced logits, float32 `[batch, target, vocab]` (arguments as in `encode`)."""
        encoded = self.encode(tokens, padding_mask=padding_mask, global_mask=global_mask, deterministic=deterministic)
        cross = self.cross_key_values(encoded)
        hidden = self.decoder_hidden(decoder_tokens, cross, source_mask=padding_mask, deterministic=deterministic)
        return self.logits(hidden)
