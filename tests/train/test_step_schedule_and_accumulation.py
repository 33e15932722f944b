"""The training step: gradient accumulation gives the whole batch's update (weighted by what the loss averages); the decay schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax.run import plan as plan_lib
from longjax.run import steps
from longjax.sections import ConfigError


def _token_loss(params, batch, *, step, dropout_key):
    """Mean squared error over the tokens marked in batch['mask'] (a masked-LM-like mean)."""
    prediction = batch["x"] @ params["w"]
    errors = jnp.where(batch["mask"], (prediction - batch["y"]) ** 2, 0.0)
    count = batch["mask"].sum()
    return errors.sum() / count, {"count": count.astype(jnp.float32)}


def _row_loss(params, batch, *, step, dropout_key):
    prediction = batch["x"] @ params["w"]
    return ((prediction - batch["y"]) ** 2).mean(), {}


def _batch(seed=0, rows=8, tokens=5):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, tokens)) < 0.4
    mask[0, 0] = True
    return {
        "x": jnp.asarray(rng.normal(size=(rows, tokens, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(rows, tokens)), jnp.float32),
        "mask": jnp.asarray(mask),
    }


def _step(loss_fn, k, weight=None):
    tx = steps.optimizer(plan_lib.OptimizerSection())
    state = steps.init_state({"w": jnp.asarray([0.5, -0.2, 0.1], jnp.float32)}, tx)
    train_step = steps.make_train_step(loss_fn, tx, peak_learning_rate=0.1, start_step=0, warmup_steps=0, seed=0,
                                       grad_accumulation=k, loss_weight=weight)
    return jax.jit(train_step)(state, _batch())


@pytest.mark.parametrize("k", [2, 4, 8])
def test_weighted_micro_batches_give_the_whole_batch_update(k):
    weight = lambda batch: batch["mask"].sum()
    whole_state, whole_metrics = _step(_token_loss, 1)
    state, metrics = _step(_token_loss, k, weight)
    chex.assert_trees_all_close(state.params, whole_state.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-5)


def test_unweighted_micro_batches_give_the_per_row_mean():
    whole_state, _ = _step(_row_loss, 1)
    state, _ = _step(_row_loss, 4)
    chex.assert_trees_all_close(state.params, whole_state.params, rtol=1e-5, atol=1e-6)


def test_a_token_mean_without_its_weight_is_not_the_whole_batch_mean():
    # The weighting matters: an unweighted mean of micro-batch token means differs.
    whole_state, _ = _step(_token_loss, 1)
    state, _ = _step(_token_loss, 4)
    assert not np.allclose(state.params["w"], whole_state.params["w"], rtol=1e-5, atol=1e-6)


def test_a_batch_that_does_not_split_is_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"phases.batch_size\[0\] \(6\) must be a multiple of optimizer.grad_accumulation \(4\)"):
        plan_lib._phases(
            {"seq_len": (8,), "batch_size": (6,), "steps": (1,), "learning_rate": (1e-3,), "window_scale": (1,)},
            plan_lib.OptimizerSection(grad_accumulation=4), None, _NoTask(), plan_lib.MeshSection(),
        )
    with pytest.raises(ConfigError, match="optimizer.grad_accumulation"):
        plan_lib.OptimizerSection(grad_accumulation=0)


class _NoTask:
    def phase_model(self, model, **_):
        return model


def test_polynomial_decay_warms_up_then_falls_to_zero_at_the_phase_end():
    lr = lambda s, power: float(steps.learning_rate(s, peak=1.0, start_step=10, warmup_steps=4, end_step=30,
                                                    decay="polynomial", decay_power=power))
    assert [lr(s, 1.0) for s in (10, 11, 12, 13)] == [0.25, 0.5, 0.75, 1.0]
    # 16 decay steps after the warmup: step 14 is the first, 30 the end.
    np.testing.assert_allclose([lr(s, 1.0) for s in (14, 22, 29, 30)], [1.0, 0.5, 1 / 16, 0.0], rtol=1e-6)
    np.testing.assert_allclose(lr(22, 3.0), 0.125, rtol=1e-6)
    assert float(steps.learning_rate(25, peak=2.0, start_step=10, warmup_steps=4)) == 2.0


def test_rsqrt_decay_is_the_inverse_square_root_after_the_warmup():
    lr = lambda s: float(steps.learning_rate(s, peak=2.0, start_step=10, warmup_steps=4, decay="rsqrt"))
    assert [lr(s) for s in (10, 11, 12, 13)] == [0.5, 1.0, 1.5, 2.0]
    # LRA's `c / sqrt(max(step, warmup))` with c = peak * sqrt(warmup): 16 steps in, half the peak.
    np.testing.assert_allclose([lr(13), lr(25), lr(10 + 63)], [2.0, 1.0, 0.5], rtol=1e-6)


def test_cosine_decay_falls_as_a_half_cosine_to_zero_at_the_phase_end():
    lr = lambda s: float(steps.learning_rate(s, peak=1.0, start_step=10, warmup_steps=4, end_step=30,
                                             decay="cosine"))
    assert [lr(s) for s in (10, 11, 12, 13)] == [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose([lr(14), lr(22), lr(26), lr(30)], [1.0, 0.5, 0.5 - 0.5 * np.sqrt(0.5), 0.0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="needs end_step"):
        steps.learning_rate(20, peak=1.0, start_step=10, warmup_steps=4, decay="cosine")
    with pytest.raises(ConfigError, match="optimizer.decay"):
        plan_lib.OptimizerSection(decay="linear")


def test_head_learning_rate_scale_scales_only_the_head_updates():
    def loss(params, batch, *, step, dropout_key):
        p = params["params"]
        prediction = batch["x"] @ p["encoder"]["w"] + batch["x"] @ p["head"]["w"]
        return ((prediction - batch["y"]) ** 2).mean(), {}

    def update(scale):
        tx = steps.optimizer(plan_lib.OptimizerSection(head_learning_rate_scale=scale))
        params = {"params": {"encoder": {"w": jnp.asarray([0.5, -0.2, 0.1])}, "head": {"w": jnp.asarray([0.3, 0.0, -0.4])}}}
        state = steps.init_state(params, tx)
        step = steps.make_train_step(loss, tx, peak_learning_rate=0.01, start_step=0, warmup_steps=0, seed=0)
        new, _ = jax.jit(step)(state, _batch())
        return jax.tree.map(lambda a, b: a - b, new.params, params)["params"]

    plain, scaled = update(1.0), update(20.0)
    np.testing.assert_allclose(scaled["encoder"]["w"], plain["encoder"]["w"], rtol=1e-6)
    np.testing.assert_allclose(scaled["head"]["w"], 20.0 * plain["head"]["w"], rtol=1e-5)
    assert np.all(np.abs(plain["head"]["w"]) > 0)
    with pytest.raises(ConfigError, match="optimizer.head_learning_rate_scale"):
        plan_lib.OptimizerSection(head_learning_rate_scale=0.0)
