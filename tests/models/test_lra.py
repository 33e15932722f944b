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


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("pooling", ["cls", "mean"])
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
    chex.assert_shape(model.apply(params, pair), (2, 3))
    assert set(params["params"]) == {"encoder", "classifier_hidden", "classifier_out"}
    # [u, v, u*v, u-v]: swapping the documents changes the input of the classifier, so the logits.
    swapped = pair[:, ::-1]
    assert not np.allclose(model.apply(params, pair), model.apply(params, swapped))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, 2, seq\]"):
        model.apply(params, pair[:, 0])


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
