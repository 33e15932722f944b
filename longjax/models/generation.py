"""`generate`: the encoder once per source, its cross-attention keys once, then a cached search.

Memory is what decides whether LED decodes 16K-token papers: the encoder
output and every decoder layer's cross-attention keys and values are
`[batch, source, ...]` and stay so; only the decoder's self-attention cache
(`[batch * beams, max_length, heads, head_dim]` per layer) grows with the
beams. Hugging Face's Flax generation tiles the encoder output per beam
instead (4 beams of LED-large at 16K tokens: 6 GiB of keys and values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax.models.decoding import Generated, GenerationSettings, search
from longjax.models.encoder_decoder import LongEncoderDecoder


def init_cache(model: LongEncoderDecoder, params, cross, rows: int, max_length: int, source_mask=None):
    """An empty decoder cache for `rows` hypotheses of up to `max_length` tokens (zeros, built without running it)."""
    decoder = model.clone(decode=True)

    def sized(params, cross, source_mask):
        tokens = jnp.zeros((rows, max_length), jnp.int32)
        _, variables = decoder.apply(
            {"params": params}, tokens, cross, source_mask=source_mask, method=LongEncoderDecoder.decoder_hidden,
            mutable=["cache"],
        )
        return variables["cache"]

    shapes = jax.eval_shape(sized, params, cross, source_mask)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(
    model: LongEncoderDecoder, params, tokens, *, padding_mask=None, global_mask=None,
    settings: GenerationSettings = GenerationSettings(),
) -> Generated:
    """Summaries of `tokens` by greedy or beam search (see `longjax.models.decoding`); jit-compatible.

    Args:
      model: the LongEncoderDecoder (its `decode` attribute is ignored).
      params: its parameters.
      tokens: int `[batch, source]`.
      padding_mask: optional bool `[batch, source]`, True for real tokens.
      global_mask: optional bool `[batch, source]` for the encoder's global
        tokens (bounded by the encoder attention's `max_global_tokens` under jit).
      settings: the search.

    Returns:
      `Generated` with `[batch, num_return_sequences, ...]` arrays.
    """
    positions = model.config.decoder.max_positions
    if settings.max_length > positions:
        raise ValueError(f"decode.max_length ({settings.max_length}) must be <= the decoder's {positions} positions "
                         "(model.decoder.max_positions)")
    model = model.clone(decode=False)
    variables = {"params": params}
    encoded = model.apply(variables, tokens, padding_mask=padding_mask, global_mask=global_mask,
                          method=LongEncoderDecoder.encode)
    cross = model.apply(variables, encoded, method=LongEncoderDecoder.cross_key_values)
    batch = tokens.shape[0]
    rows = batch * settings.num_beams
    cache = init_cache(model, params, cross, rows, settings.max_length, padding_mask)
    decoder = model.clone(decode=True)

    def step(step_tokens, cache):
        hidden, updated = decoder.apply(
            {"params": params, "cache": cache}, step_tokens, cross, source_mask=padding_mask,
            method=LongEncoderDecoder.decoder_hidden, mutable=["cache"],
        )
        return decoder.apply(variables, hidden[:, -1], method=LongEncoderDecoder.logits), updated["cache"]

    return search(step, cache, batch, settings)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def generate_jit(model, params, tokens, padding_mask=None, global_mask=None, *, settings: GenerationSettings):
    """`generate`, compiled once per (model, settings, shapes)."""
    return generate(model, params, tokens, padding_mask=padding_mask, global_mask=global_mask, settings=settings)
