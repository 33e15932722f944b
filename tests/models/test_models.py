"""CharLM and LongEncoder: pattern equivalences, sizes, dtypes, remat, purity (causality: test_causality.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models
from tests.attention.battery import TOLERANCES
from tests.models.helpers import ATTENTION, WIDE_ATTENTION, tiny_config

SEQ = 24


def _tokens(seed, batch=2, seq=SEQ, vocab=32):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


def _param_count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("attention", sorted(WIDE_ATTENTION))
def test_wide_patterns_equal_full_attention_with_the_same_parameters(attention):
    full = models.CharLM(tiny_config(dict(type="full")))
    sparse = models.CharLM(tiny_config(WIDE_ATTENTION[attention]))
    tokens = _tokens(2)
    params = full.init(jax.random.key(3), tokens)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        sparse.init(jax.random.key(3), tokens)
    )
    chex.assert_trees_all_close(
        jax.jit(sparse.apply)(params, tokens), jax.jit(full.apply)(params, tokens), atol=2e-5, rtol=2e-5
    )


@pytest.mark.parametrize("attention", sorted(WIDE_ATTENTION))
def test_wide_encoder_equals_full_encoder_with_padding(attention):
    kwargs = dict(position="learned", position_offset=1, type_vocab_size=1, layer_norm="post")
    full = models.LongEncoder(tiny_config(dict(type="full"), **kwargs))
    sparse = models.LongEncoder(tiny_config(WIDE_ATTENTION[attention], **kwargs))
    tokens = _tokens(4)
    padding = jnp.arange(SEQ)[None, :] < jnp.array([[SEQ], [SEQ - 7]])
    params = full.init(jax.random.key(5), tokens, padding_mask=padding)
    out_full = jax.jit(full.apply)(params, tokens, padding_mask=padding)
    out_sparse = jax.jit(sparse.apply)(params, tokens, padding_mask=padding)
    chex.assert_trees_all_close(out_sparse, out_full, atol=2e-5, rtol=2e-5)
    # Padded tokens' content does not reach the real tokens.
    scrambled = jnp.where(padding, tokens, (tokens + 5) % 32)
    out_scrambled = jax.jit(sparse.apply)(params, scrambled, padding_mask=padding)
    chex.assert_trees_all_close(
        jnp.where(padding[..., None], out_scrambled, 0), jnp.where(padding[..., None], out_sparse, 0),
        atol=1e-6, rtol=1e-6,
    )


def test_performer_approaches_full_attention_as_features_grow():
    tokens = _tokens(6)
    full = models.CharLM(tiny_config(dict(type="full"), position="none"))
    params = full.init(jax.random.key(7), tokens)

    # FAVOR+'s variance grows like exp(|q|^2 + |k|^2) (Performer paper, Lemma 2):
    # halving the query/key kernels keeps the scores in the regime it is built for.
    def halve_query_key(path, x):
        names = {getattr(p, "key", None) for p in path}
        return x * 0.5 if names & {"query", "key"} else x

    params = jax.tree_util.tree_map_with_path(halve_query_key, params)
    reference = jax.jit(full.apply)(params, tokens)

    def mean_error(num_features):
        model = models.CharLM(
            tiny_config(dict(type="performer", num_features=num_features), position="none")
        )
        return float(jnp.mean(jnp.abs(jax.jit(model.apply)(params, tokens) - reference)))

    errors = [mean_error(m) for m in (8, 128, 4096)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.03 * float(jnp.mean(jnp.abs(reference))), errors


def _expected_char_lm_params(num_layers, d_model, d_ff, vocab):
    attention = 4 * (d_model * d_model + d_model)  # q, k, v, out with biases
    relative = d_model * d_model + 2 * d_model  # W_R, u, v
    mlp = 2 * d_model * d_ff + d_ff + d_model
    norms = 2 * 2 * d_model
    per_layer = attention + relative + mlp + norms
    return num_layers * per_layer + vocab * d_model + (d_model * vocab + vocab) + 2 * d_model


@pytest.mark.parametrize("num_layers, expected_millions", [(12, 41), (30, 102)])
def test_longformer_char_lm_parameter_counts(num_layers, expected_millions):
    cfg = models.transformer_config(
        dict(vocab_size=256, num_layers=num_layers, num_heads=8, d_model=512, d_ff=2048,
             attention=dict(type="sliding_window", window=256))
    )
    shapes = jax.eval_shape(models.CharLM(cfg).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    count = _param_count(shapes)
    assert count == _expected_char_lm_params(num_layers, 512, 2048, 256)
    # The paper reports whole millions, truncated (41.25M -> "41M", 102.73M -> "102M").
    assert count // 10**6 == expected_millions, count


@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_bfloat16_forward_is_finite_and_close_to_float32(attention):
    tokens = _tokens(8)
    model32 = models.CharLM(tiny_config(ATTENTION[attention]))
    model16 = models.CharLM(tiny_config(ATTENTION[attention], dtype="bfloat16"))
    params = model32.init(jax.random.key(9), tokens)
    logits32 = jax.jit(model32.apply)(params, tokens)
    logits16 = jax.jit(model16.apply)(params, tokens)
    assert logits16.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits16)).all()
    chex.assert_trees_all_close(logits16, logits32, atol=5e-2, rtol=5e-2)


def _loss(model, params, tokens, rng):
    logits = model.apply(params, tokens, deterministic=False, rngs={"dropout": rng})
    return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(tokens[:, 1:], 32)) * 32


@pytest.mark.parametrize("attention", ["sliding_window", "performer"])
def test_remat_gives_the_same_gradients(attention):
    tokens = _tokens(10)
    plain = models.CharLM(tiny_config(ATTENTION[attention], dropout=0.1, attention_dropout=0.1))
    remat = models.CharLM(tiny_config(ATTENTION[attention], dropout=0.1, attention_dropout=0.1, remat=True))
    params = plain.init(jax.random.key(11), tokens)
    rng = jax.random.key(12)
    grads = jax.jit(jax.grad(lambda p: _loss(plain, p, tokens, rng)))(params)
    grads_remat = jax.jit(jax.grad(lambda p: _loss(remat, p, tokens, rng)))(params)
    # Recomputation compiles to a different fusion order, so the gradients agree to
    # float32 rounding (the same function jitted vs eager differs by ~5e-6 here).
    chex.assert_trees_all_close(grads_remat, grads, **TOLERANCES[jnp.dtype(jnp.float32)])
    assert _param_count(grads) == _param_count(params)


def test_init_and_apply_are_pure():
    model = models.CharLM(tiny_config(ATTENTION["block_sparse"], dropout=0.2))
    tokens = _tokens(13)
    params = model.init(jax.random.key(14), tokens)
    chex.assert_trees_all_equal(params, model.init(jax.random.key(14), tokens))
    run = lambda rng: model.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(rng)})
    chex.assert_trees_all_equal(run(15), run(15))
    assert not np.allclose(run(15), run(16))
    chex.assert_trees_all_equal(model.apply(params, tokens), model.apply(params, tokens))


def test_per_layer_windows_and_dilation_reach_the_layers():
    cfg = tiny_config(
        dict(type="sliding_window", window=2),
        num_layers=3, attention_per_layer=dict(window=[1, 2, 4], dilation=[1, 1, (1, 2)]),
    )
    model = models.CharLM(cfg)
    tokens = _tokens(17)
    params = model.init(jax.random.key(18), tokens)
    logits = jax.jit(model.apply)(params, tokens)
    # Changing the last layer's dilation changes the result: the config reaches it.
    undilated = models.CharLM(tiny_config(
        dict(type="sliding_window", window=2),
        num_layers=3, attention_per_layer=dict(window=[1, 2, 4], dilation=[1, 1, 1]),
    ))
    assert not np.allclose(jax.jit(undilated.apply)(params, tokens), logits, atol=1e-4)


def test_encoder_position_ids_need_learned_positions():
    """Explicit position_ids (Hugging Face's, from input_ids != pad) are rows of the learned table only."""
    common = dict(vocab_size=16, num_layers=1, num_heads=2, d_model=8, d_ff=16, attention=(models.FullAttention(),))
    learned = models.LongEncoder(models.TransformerConfig(**common, position="learned", max_positions=12, position_offset=1))
    tokens = jnp.array([[3, 4, 5, 1]])
    params = learned.init(jax.random.key(0), tokens)
    padding = jnp.array([[True, True, True, False]])
    explicit = learned.apply(params, tokens, padding_mask=padding, position_ids=jnp.array([[2, 3, 4, 1]]))
    implied = learned.apply(params, tokens, padding_mask=padding)
    assert jnp.array_equal(explicit, implied)
    shifted = learned.apply(params, tokens, padding_mask=padding, position_ids=jnp.array([[3, 4, 5, 1]]))
    assert not jnp.allclose(shifted, implied)
    rope = models.LongEncoder(models.TransformerConfig(**common, position="rope"))
    with pytest.raises(ValueError, match="position_ids given but model.position is 'rope'"):
        rope.init(jax.random.key(0), tokens, position_ids=jnp.array([[2, 3, 4, 1]]))
