"""The LRA classifier: every attention pattern, pooling and the document-pair head; padding changes nothing."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models

ATTENTIONS = {
    "full": models.FullAttention(),
    "sliding_window": models.SlidingWindowAttention(window=4, max_global_tokens=1),
    "block_sparse": models.BlockSparseAttention(block_size=4, num_window_blocks=3, global_blocks=(0,),
                                                num_random_blocks=1),
    "performer": models.PerformerAttention(num_features=16),
}


def _config(attention, **overrides):
    """A 2-layer config with `attention` in both layers, `overrides` on top."""
    fields = dict(vocab_size=12, num_layers=2, num_heads=2, d_model=16, d_ff=32, attention=(attention,) * 2,
                  position="learned", max_positions=65, num_labels=3, pooling="cls", classifier_dim=8)
    fields.update(overrides)
    return models.LRAConfig(**fields)


def _tokens(seed, shape, real):
    """Random ids in [1, 12) with the last `shape[-1] - real` positions padding (0)."""
    tokens = jax.random.randint(jax.random.key(seed), shape, 1, 12)
    return jnp.where(jnp.arange(shape[-1]) < real, tokens, 0)


# Each pattern once, each pooling with both patterns that mask padding exactly at any length.
@pytest.mark.parametrize("attention, pooling", [
    ("full", "mean"), ("sliding_window", "cls"), ("block_sparse", "cls"), ("performer", "mean"),
])
def test_logits_shape_and_padding_invariance(attention, pooling):
    glob = attention == "sliding_window" and pooling == "cls"
    model = models.LRAClassifier(_config(ATTENTIONS[attention], pooling=pooling, global_first_token=glob))
    tokens = _tokens(0, (3, 32), real=24)
    params = model.init(jax.random.key(1), tokens)
    logits = model.apply(params, tokens)
    chex.assert_shape(logits, (3, 3))
    chex.assert_tree_all_finite(logits)
    if attention in ("full", "sliding_window"):
        # Padding is masked everywhere (keys, the mean, the global token), so more of it changes nothing.
        longer = jnp.pad(tokens, ((0, 0), (0, 16)))
        chex.assert_trees_all_close(model.apply(params, longer), logits, atol=2e-5, rtol=2e-5)


def test_pair_head_reads_both_documents_with_one_encoder():
    model = models.LRAClassifier(_config(ATTENTIONS["full"], pair=True))
    pair = jnp.stack([_tokens(2, (2, 16), 16), _tokens(3, (2, 16), 10)], axis=1)
    params = model.init(jax.random.key(0), pair)
    logits = model.apply(params, pair)
    chex.assert_shape(logits, (2, 3))
    # One encoder for both documents (LRA's dual encoder), no CLS row added, LRA's three-layer head on [u, v].
    p = params["params"]
    assert set(p) == {"encoder", "classifier_hidden", "classifier_hidden2", "classifier_out"}
    assert p["encoder"]["embed"]["embedding"].shape[0] == 12
    assert p["classifier_hidden"]["kernel"].shape == (2 * 16, 8) and p["classifier_hidden2"]["kernel"].shape == (8, 4)
    # Each document's first token is pooled: the head's input is [u, v] of the two encodings, in order.
    encode = lambda tokens: models.LongEncoder(model.config).apply({"params": p["encoder"]}, tokens,
                                                                   padding_mask=tokens != 0)[:, 0]
    u, v = encode(pair[:, 0]), encode(pair[:, 1])
    h = jax.nn.relu(jnp.concatenate([u, v], -1) @ p["classifier_hidden"]["kernel"] + p["classifier_hidden"]["bias"])
    h = jax.nn.relu(h @ p["classifier_hidden2"]["kernel"] + p["classifier_hidden2"]["bias"])
    chex.assert_trees_all_close(h @ p["classifier_out"]["kernel"] + p["classifier_out"]["bias"], logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, 2, seq\]"):
        model.apply(params, pair[:, 0])


def test_cls_pooling_prepends_a_learned_token_and_pools_it():
    model = models.LRAClassifier(_config(ATTENTIONS["full"]))
    tokens = _tokens(5, (2, 16), 12)
    params = model.init(jax.random.key(0), tokens)
    p = params["params"]
    # The CLS vector is one more row of the embedding table (id vocab_size), at position 0.
    assert p["encoder"]["embed"]["embedding"].shape[0] == 13
    wider = dataclasses.replace(model.config, vocab_size=13)
    with_cls = jnp.concatenate([jnp.full((2, 1), 12), tokens], axis=1)
    hidden = models.LongEncoder(wider).apply({"params": p["encoder"]}, with_cls, padding_mask=with_cls != 0)
    h = jax.nn.relu(hidden[:, 0] @ p["classifier_hidden"]["kernel"] + p["classifier_hidden"]["bias"])
    chex.assert_trees_all_close(h @ p["classifier_out"]["kernel"] + p["classifier_out"]["bias"],
                                model.apply(params, tokens), atol=1e-5)


def test_sinusoidal_positions_are_the_transformers():
    from longjax.models import positions

    table = positions.absolute_sinusoid(jnp.arange(5), 6)
    expected = np.zeros((5, 6))
    for p in range(5):
        for i in range(3):
            expected[p, 2 * i] = np.sin(p / 10000 ** (2 * i / 6))
            expected[p, 2 * i + 1] = np.cos(p / 10000 ** (2 * i / 6))
    np.testing.assert_allclose(table, expected, atol=1e-6)
    # The encoder adds them: the same tokens at other positions encode differently, and nothing is learned.
    model = models.LRAClassifier(_config(ATTENTIONS["full"], position="sinusoidal", pooling="mean"))
    params = model.init(jax.random.key(0), _tokens(6, (1, 8), 8))
    assert "position_embed" not in params["params"]["encoder"]
    tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert not np.allclose(model.apply(params, tokens), model.apply(params, tokens[:, ::-1]))


def test_dropout_needs_its_rng_and_changes_the_logits():
    model = models.LRAClassifier(_config(ATTENTIONS["full"], dropout=0.5))
    tokens = _tokens(4, (2, 16), 16)
    params = model.init(jax.random.key(0), tokens)
    a = model.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = model.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


@pytest.mark.parametrize("change, message", [
    (dict(attention=ATTENTIONS["performer"], global_first_token=True),
     "model.global_first_token needs sliding-window or block-sparse attention in every layer; layer 0 is "
     "PerformerAttention"),
    (dict(attention=models.SlidingWindowAttention(window=4), global_first_token=True),
     r"model.attention\[0\].max_global_tokens must be >= 1"),
    (dict(pooling="max"), "model.pooling"),
    (dict(num_labels=1), "model.num_labels"),
    (dict(classifier_dim=0), "model.classifier_dim"),
    (dict(position="sinusoidal", d_model=15, num_heads=3), "model.position='sinusoidal' needs an even model.d_model"),
    (dict(attention=models.PerformerAttention(num_features=8, random_features=False)),
     r"model.attention\[0\].random_features=False \(deterministic features, relu\(x\)\) needs "
     r"model.attention\[0\].feature_map='relu'"),
    (dict(attention=models.PerformerAttention(num_features=16, feature_map="relu", random_features=False)),
     r"model.attention\[0\].num_features must be the head dimension \(8\), got 16"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        _config(**{"attention": ATTENTIONS["full"], **change})


def test_config_is_a_transformer_config_that_phases_can_replace():
    config = _config(ATTENTIONS["sliding_window"], global_first_token=True)
    assert isinstance(config, models.TransformerConfig)
    wider = dataclasses.replace(config, attention=(models.SlidingWindowAttention(window=8, max_global_tokens=1),) * 2)
    assert wider.global_first_token and wider.num_labels == 3
    assert jnp.dtype(wider.compute_dtype) == jnp.float32


def test_deterministic_performer_features_are_relu_of_the_head():
    from longjax import attention as ops
    from longjax.models import performer_projection

    layer = models.PerformerAttention(num_features=8, feature_map="relu", random_features=False)
    projection = performer_projection(0, 3, None, layer, 8)
    np.testing.assert_array_equal(projection, np.eye(8))
    keys = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(key, (1, 10, 2, 8)) for key in keys)
    out = ops.favor_attention(q, k, v, projection=projection, feature_map="relu", impl="xla")
    # Generalized attention with features relu(x / d^(1/4)) + 1e-3 (LRA's deterministic features, with
    # the 1/sqrt(d) score scale split between the two sides), written out in NumPy.
    phi = lambda x: np.maximum(np.asarray(x) / 8**0.25, 0) + 1e-3
    qf, kf = phi(q), phi(k)
    scores = np.einsum("bqhf,bkhf->bhqk", qf, kf)
    expected = np.einsum("bhqk,bkhd->bqhd", scores / scores.sum(-1, keepdims=True), np.asarray(v))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
