"""The attention layer: Longformer global projections, BigBird layouts, Performer redraws."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models
from tests.models.helpers import tiny_config

SEQ = 16


def _x(seed=0, batch=2):
    return jax.random.normal(jax.random.key(seed), (batch, SEQ, 16))


def _global_mask():
    return jnp.zeros((2, SEQ), bool).at[0, 0].set(True).at[1, 5].set(True).at[1, 9].set(True)


def test_global_projections_are_created_and_used():
    layer = models.MultiHeadAttention(
        tiny_config(dict(type="sliding_window", window=2, global_projections=True, max_global_tokens=4),
                    num_layers=1),
        layer=0, causal=False,
    )
    params = layer.init(jax.random.key(1), _x())
    assert set(models.attention.GLOBAL_PROJECTIONS) <= set(params["params"])
    apply = jax.jit(layer.apply)
    with_globals = apply(params, _x(), global_mask=_global_mask())
    without_globals = apply(params, _x())
    assert not np.allclose(with_globals, without_globals, atol=1e-3)

    # Global projections copied from the local ones give exactly Longformer
    # attention with shared projections: the conversion's starting point.
    copied = models.copy_local_to_global(params)
    shared = models.MultiHeadAttention(
        tiny_config(dict(type="sliding_window", window=2, max_global_tokens=4), num_layers=1),
        layer=0, causal=False,
    )
    local_only = {"params": {k: v for k, v in copied["params"].items()
                             if k not in models.attention.GLOBAL_PROJECTIONS}}
    chex.assert_trees_all_close(
        apply(copied, _x(), global_mask=_global_mask()),
        jax.jit(shared.apply)(local_only, _x(), global_mask=_global_mask()),
        atol=2e-5, rtol=2e-5,
    )
    # ...and differ from the freshly initialised global projections.
    assert not np.allclose(apply(copied, _x(), global_mask=_global_mask()), with_globals, atol=1e-3)


def test_copy_local_to_global_needs_the_local_projection():
    with pytest.raises(ValueError, match="'global_key' but no 'key'"):
        models.copy_local_to_global({"global_key": {"kernel": jnp.ones(2)}})


def test_block_sparse_layout_is_fixed_per_layer_and_seed():
    assert models.layer_seed(0, 1) == models.layer_seed(0, 1)
    assert len({models.layer_seed(s, l) for s in range(3) for l in range(4)}) == 12

    def output(seed, layer_index):
        # 8 blocks: 5 of them window or global, so the random blocks matter.
        attention = dict(type="block_sparse", block_size=2, num_window_blocks=3, num_random_blocks=2)
        cfg = tiny_config(attention, num_layers=3, seed=seed)
        layer = models.MultiHeadAttention(cfg, layer=layer_index, causal=False)
        params = models.MultiHeadAttention(cfg, layer=0, causal=False).init(jax.random.key(2), _x())
        return layer.apply(params, _x())

    chex.assert_trees_all_equal(output(0, 1), output(0, 1))
    # Same parameters, another layer or model seed: another random layout.
    assert not np.allclose(output(0, 1), output(0, 2), atol=1e-4)
    assert not np.allclose(output(0, 1), output(1, 1), atol=1e-4)


def test_performer_projection_redraws_every_interval():
    cfg = tiny_config(dict(type="performer", num_features=8, redraw_interval=10), num_layers=1)
    layer = models.MultiHeadAttention(cfg, layer=0, causal=True)
    params = layer.init(jax.random.key(3), _x(), step=0)
    apply = jax.jit(layer.apply)
    at = lambda step: apply(params, _x(), step=jnp.asarray(step))
    chex.assert_trees_all_equal(at(0), at(9))
    chex.assert_trees_all_equal(at(20), at(29))
    assert not np.allclose(at(9), at(10), atol=1e-4)
    chex.assert_trees_all_equal(
        models.performer_projection(0, 0, 23, cfg.attention[0], 8),
        models.performer_projection(0, 0, 20, cfg.attention[0], 8),
    )


def test_performer_without_redraw_ignores_the_step():
    cfg = tiny_config(dict(type="performer", num_features=8), num_layers=1)
    layer = models.MultiHeadAttention(cfg, layer=0, causal=True)
    params = layer.init(jax.random.key(4), _x())
    chex.assert_trees_all_equal(layer.apply(params, _x()), layer.apply(params, _x(), step=12345))


def test_performer_errors_name_what_is_missing():
    redraw = tiny_config(dict(type="performer", num_features=8, redraw_interval=5), num_layers=1)
    with pytest.raises(ValueError, match=r"redraw_interval=5 needs the training step"):
        models.MultiHeadAttention(redraw, layer=0, causal=True).init(jax.random.key(0), _x())
    plain = tiny_config(dict(type="performer", num_features=8), num_layers=1)
    with pytest.raises(ValueError, match="performer attention has no global tokens"):
        models.MultiHeadAttention(plain, layer=0, causal=False).init(
            jax.random.key(0), _x(), global_mask=_global_mask()
        )


def test_attention_dropout_is_active_only_in_training():
    cfg = tiny_config(dict(type="full"), num_layers=1, attention_dropout=0.5)
    x = _x()
    params = models.MultiHeadAttention(cfg, layer=0, causal=True).init(jax.random.key(5), x)
    train = models.MultiHeadAttention(cfg, layer=0, causal=True, deterministic=False)
    evaluate = models.MultiHeadAttention(cfg, layer=0, causal=True, deterministic=True)
    dropped = train.apply(params, x, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(dropped, evaluate.apply(params, x), atol=1e-3)
