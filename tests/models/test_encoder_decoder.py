"""LongEncoderDecoder and its search: cache, exhaustive beam search, one encoder pass, shared cross-attention keys."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.models import transformer_config
from longjax.models.decoding import GenerationSettings
from longjax.models.encoder_decoder import EncoderDecoderConfig, LongEncoderDecoder
from longjax.models.generation import generate, generate_jit, init_cache

EOS, PAD, START = 2, 1, 0

# Cached step-by-step decoding against the full teacher-forced decoder (float32, CPU): the same math in
# another summation order (the cache, beams folded into the cross-attention's query axis).
CACHED_LOGITS_ATOL = 2e-5


def tiny(vocab=40, *, d_model=16, source=64, window=3, layers=2, max_global_tokens=2):
    common = dict(vocab_size=vocab, d_model=d_model, num_heads=2, d_ff=32, num_layers=layers, position="learned",
                  layer_norm="post")
    encoder = transformer_config(dict(common, max_positions=source, attention=dict(
        type="sliding_window", window=window, global_projections=True, max_global_tokens=max_global_tokens)))
    decoder = transformer_config(dict(common, max_positions=32, attention=dict(type="full")))
    return EncoderDecoderConfig(encoder, decoder, position_offset=2)


def init(config, seed=0, scale=1.0):
    model = LongEncoderDecoder(config)
    params = model.init(jax.random.key(seed), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    # Wider than the default init so that the distributions are far from uniform.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + scale * 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree_util.tree_unflatten(tree, leaves)


def source(batch=2, seq=20, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3 if vocab > 3 else 0, vocab, size=(batch, seq))
    padding = np.ones((batch, seq), bool)
    padding[1:, seq - 5:] = False
    tokens[~padding] = PAD
    glob = np.zeros((batch, seq), bool)
    glob[:, 0] = True
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(padding), jnp.asarray(glob)


def test_cached_decoding_equals_full_sequence_logits():
    config = tiny()
    model, params = init(config)
    tokens, padding, glob = source()
    target = jnp.asarray(np.random.default_rng(1).integers(3, 40, size=(2, 9)), jnp.int32)
    v = {"params": params}
    full = jax.jit(lambda: model.apply(v, tokens, target, padding_mask=padding, global_mask=glob))()
    cross = jax.jit(lambda: model.apply(v, model.apply(
        v, tokens, padding_mask=padding, global_mask=glob, method=LongEncoderDecoder.encode),
        method=LongEncoderDecoder.cross_key_values))()
    cache = init_cache(model, params, cross, 2, 12, padding)
    decoder = model.clone(decode=True)

    @jax.jit
    def step(cache, tokens):
        hidden, updated = decoder.apply({"params": params, "cache": cache}, tokens, cross, source_mask=padding,
                                        method=LongEncoderDecoder.decoder_hidden, mutable=["cache"])
        return updated["cache"], model.apply(v, hidden, method=LongEncoderDecoder.logits)

    stepped = []
    # Steps of one, then a block of three: the cache takes any number of new tokens per call.
    for start, stop in ((0, 1), (1, 2), (2, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
        cache, logits = step(cache, target[:, start:stop])
        stepped.append(logits)
    np.testing.assert_allclose(jnp.concatenate(stepped, axis=1), full, rtol=0, atol=CACHED_LOGITS_ATOL)


def _next_token_log_probs(model, params, tokens, padding, glob):
    """prefix -> log-probabilities of the next token, by the uncached teacher-forced model."""
    forward = jax.jit(lambda prefix: jax.nn.log_softmax(model.apply(
        {"params": params}, tokens, prefix, padding_mask=padding, global_mask=glob)[0, -1]))
    return lambda prefix: np.asarray(forward(jnp.asarray([prefix], jnp.int32)))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_full_width_beam_search_is_exhaustive_search(length_penalty):
    """With 3 tokens and num_beams = 3**3, beam search returns every hypothesis, ranked as exhaustive search ranks them."""
    config = tiny(vocab=3)
    model, params = init(config, seed=3, scale=3.0)
    tokens, padding, glob = source(batch=1, vocab=3, seed=4)
    new_tokens = 3
    settings = GenerationSettings(max_length=1 + new_tokens, num_beams=3**new_tokens, length_penalty=length_penalty,
                                  early_stopping="never", decoder_start_token_id=START, eos_token_id=EOS,
                                  pad_token_id=PAD, num_return_sequences=3**new_tokens)
    out = generate(model, params, tokens, padding_mask=padding, global_mask=glob, settings=settings)
    log_probs = _next_token_log_probs(model, params, tokens, padding, glob)
    hypotheses = {}
    for n in range(1, new_tokens + 1):
        for body in itertools.product((0, 1), repeat=n - 1):
            last = (EOS,) if n < new_tokens else (0, 1, EOS)  # at max_length any token ends a hypothesis
            for end in last:
                seq = (START,) + body + (end,)
                total = sum(log_probs(list(seq[:i]))[seq[i]]
                            for i in range(1, len(seq)))
                hypotheses[seq] = total / (len(seq) - 1) ** length_penalty
    ranked = sorted(hypotheses.items(), key=lambda kv: -kv[1])
    found = len(ranked)
    got_sequences = np.asarray(out.sequences[0, :found])
    got_lengths = np.asarray(out.lengths[0, :found])
    got = [tuple(int(t) for t in s[:n]) for s, n in zip(got_sequences, got_lengths)]
    assert got == [seq for seq, _ in ranked]
    # Beam search scores with the cached decoder, the oracle with the full model: each step's log-probability
    # may differ by the two paths' logit difference (CACHED_LOGITS_ATOL) in the token's logit and again in
    # the log-sum-exp, over new_tokens steps (length penalties only divide, by lengths >= 1).
    np.testing.assert_allclose(np.asarray(out.scores[0, :found]), [s for _, s in ranked], rtol=0,
                               atol=new_tokens * 2 * CACHED_LOGITS_ATOL)
    assert (np.asarray(out.scores[0, found:]) < -1e8).all()  # no hypotheses beyond those


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            subs = param if isinstance(param, (tuple, list)) else (param,)
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_the_loop_never_reruns_the_encoder_or_its_cross_attention_keys():
    config = tiny()
    model, params = init(config)
    tokens, padding, glob = source(seq=24)
    settings = GenerationSettings(max_length=8, num_beams=3, decoder_start_token_id=START, eos_token_id=EOS,
                                  pad_token_id=PAD)
    jaxpr = jax.make_jaxpr(lambda p, t, m, g: generate(model, p, t, padding_mask=m, global_mask=g,
                                                       settings=settings))(params, tokens, padding, glob)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1
    body = loops[0].params["body_jaxpr"].jaxpr
    encoder_shapes = {(2, 24, 16), (2, 24, 2, 8)}  # encoder states; cross-attention keys and values
    produced = {tuple(v.aval.shape) for e in _equations(body) for v in e.outvars if hasattr(v.aval, "shape")}
    assert not produced & encoder_shapes
    outside = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars if hasattr(v.aval, "shape")}
    assert encoder_shapes <= outside  # computed once, before the loop


def test_beams_share_the_cross_attention_keys():
    """Compiled generate at 4 beams needs no more than 1 beam plus the larger decoder cache, not 3 more copies of K/V."""
    config = tiny(source=4096, window=8, d_model=32, vocab=64)
    model, params = init(config)
    batch, seq = 1, 4096
    tokens = jnp.full((batch, seq), 5, jnp.int32)
    padding = jnp.ones((batch, seq), bool)
    glob = padding.at[:, 1:].set(False)

    def temp_bytes(beams):
        settings = GenerationSettings(max_length=16, num_beams=beams, decoder_start_token_id=START,
                                      eos_token_id=EOS, pad_token_id=PAD)
        compiled = generate_jit.lower(model, params, tokens, padding, glob, settings=settings).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    enc, dec = config.encoder, config.decoder
    kv_bytes = dec.num_layers * 2 * batch * seq * enc.d_model * 4
    cache_growth = dec.num_layers * 2 * (4 - 1) * batch * 16 * dec.d_model * 4
    extra = temp_bytes(4) - temp_bytes(1)
    assert extra < cache_growth + kv_bytes // 4, (extra, cache_growth, kv_bytes)


def test_config_errors_name_the_field():
    config = tiny()
    with pytest.raises(ValueError, match=r"model.decoder.d_model \(8\) must equal model.encoder.d_model \(16\)"):
        EncoderDecoderConfig(config.encoder, dataclasses.replace(config.decoder, d_model=8, num_heads=2))
    with pytest.raises(ValueError, match="model.decoder.attention must be full attention"):
        EncoderDecoderConfig(config.encoder, dataclasses.replace(config.decoder, attention=config.encoder.attention))
    with pytest.raises(ValueError, match="decode.max_length must be an int >= 2"):
        GenerationSettings(max_length=1)
    model, params = init(config)
    tokens, padding, glob = source()
    with pytest.raises(ValueError, match=r"decode.max_length \(33\) must be <= the decoder's 32 positions"):
        generate(model, params, tokens, padding_mask=padding, global_mask=glob, settings=GenerationSettings(max_length=33))


def test_remat_gives_the_same_loss_and_gradients():
    """`remat` (the config's default at 16K tokens) recomputes the same dropout masks and activations.

    Recomputed activations may round differently in float32 (XLA fuses them anew): the bound is
    1e-5 relative to the largest gradient entry (some leaves, like key biases under softmax, are zero
    up to rounding); a different dropout mask would differ by ~1e-1.
    """
    config = tiny()
    model, params = init(config)
    remat = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, remat=True, dropout=0.1),
                                decoder=dataclasses.replace(config.decoder, remat=True, dropout=0.1))
    plain = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, dropout=0.1),
                                decoder=dataclasses.replace(config.decoder, dropout=0.1))
    tokens, padding, glob = source()
    target = jnp.asarray(np.random.default_rng(2).integers(3, 40, size=(2, 6)), jnp.int32)

    def loss(cfg):
        def f(p):
            logits = LongEncoderDecoder(cfg).apply({"params": p}, tokens, target, padding_mask=padding,
                                                   global_mask=glob, deterministic=False,
                                                   rngs={"dropout": jax.random.key(7)})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
        return jax.jit(jax.value_and_grad(f))(params)

    (a, grads_a), (b, grads_b) = loss(remat), loss(plain)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_b))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * scale), grads_a, grads_b)
