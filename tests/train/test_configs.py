"""Every config in configs/ loads and validates; the Longformer recipe is what the paper says; bad configs are named."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longjax import models, run
from longjax.run import steps
from longjax.tasks import char_lm
from tests.train import tiny_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
# Files starting with "_" are helpers the configs import (configs/_lra.py), not configs.
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
# The paper's dilated layers (appendix A), by its dilation d: heads 6-7 of these layers use d + 1 here.
PAPER_DILATION_LAYERS = {
    "small": {1: range(6, 8), 2: range(8, 10), 3: range(10, 12)},
    "large": {1: range(15, 20), 2: range(20, 25), 3: range(25, 30)},
}


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_loads_validates_and_plans(path):
    config = _load(path)
    phases = run.parse(config).phases
    assert phases[0].start_step == 0
    assert all(a.end_step == b.start_step for a, b in zip(phases, phases[1:]))


@pytest.mark.parametrize("corpus", ["enwik8", "text8"])
@pytest.mark.parametrize("size, steps, layers, dropout", [
    ("small", (430_000, 50_000, 50_000, 35_000, 5_000), 12, 0.2),
    ("large", (350_000, 25_000, 10_000, 5_000, 5_000), 30, 0.4),
])
def test_longformer_recipe(corpus, size, steps, layers, dropout):
    config = _load(CONFIG_DIR / f"{corpus}_{size}.py")
    phases = run.parse(config).phases
    assert [p.seq_len for p in phases] == [2048, 4096, 8192, 16384, 23040]
    assert [p.batch_size for p in phases] == [32, 32, 16, 16, 16]
    assert [p.steps for p in phases] == list(steps)
    assert [p.learning_rate for p in phases] == [2.5e-4 / 2**i for i in range(5)]
    assert [p.warmup_steps for p in phases] == [min(s // 10, 10_000) for s in steps]
    model = phases[0].model
    assert (model.num_layers, model.num_heads, model.d_model, model.dropout) == (layers, 8, 512, dropout)
    assert model.position == "txl_relative" and model.layer_norm == "pre" and model.activation == "gelu"
    # The flagship's position term is computed in its sliding-window ops, not as 512 extra head features.
    assert all(model.native_relative(layer) for layer in range(model.num_layers))
    assert config.optimizer.grad_clip_norm == 0.25 and config.optimizer.weight_decay == 0.01
    base = models.transformer_config(config.model)
    assert base.attention[0].window == 32 and base.attention[-1].window == 8192
    # Each phase doubles every window, clipped to the phase's length.
    for phase in phases:
        scale = 2**phase.index
        assert [a.window for a in phase.model.attention] == [
            min(a.window * scale, phase.seq_len) for a in base.attention
        ]
    dilated = {1: (1,) * 6 + (2, 2), 2: (1,) * 6 + (3, 3), 3: (1,) * 6 + (4, 4)}
    expected = [1] * layers
    for paper_d, span in PAPER_DILATION_LAYERS[size].items():
        for layer in span:
            expected[layer] = dilated[paper_d]
    assert [a.dilation for a in base.attention] == expected
    undilated = 6 if size == "small" else 15
    assert all(d == 1 for d in expected[:undilated]) and all(d != 1 for d in expected[undilated:])


def _bad(mutate):
    config = tiny_config.get_config()
    mutate(config)
    return config


@pytest.mark.parametrize("variant, native", [("enwik8_small_block_sparse", True), ("enwik8_small_performer", False)])
def test_pattern_variants_compute_txl_positions_in_the_op_where_it_can(variant, native):
    model = models.transformer_config(_load(CONFIG_DIR / f"{variant}.py").model)
    assert [model.native_relative(layer) for layer in range(model.num_layers)] == [native] * model.num_layers


@pytest.mark.parametrize("mutate, message", [
    (lambda c: setattr(c.model, "attention_per_layer", dict(window=(4, 8, 16))),
     r"attention_per_layer.window must list one value per layer \(model.num_layers = 2\)"),
    (lambda c: setattr(c.phases, "steps", (6,)), r"phases lists must have equal lengths"),
    (lambda c: setattr(c.phases, "seq_len", (16, 0)), r"phases.seq_len\[1\] must be a positive int"),
    (lambda c: c.model.attention.update(dict(type="linformer")), r"model.attention.type must be one of"),
    (lambda c: setattr(c.eval, "step", 64), r"eval.step \(64\) must not exceed eval.seq_len \(32\)"),
    (lambda c: setattr(c.data, "name", "wikitext"), r"data.name must be one of"),
    (lambda c: setattr(c.optimizer, "grad_clip_norm", 0.0), r"optimizer.grad_clip_norm must be a positive"),
    (lambda c: setattr(c.phases, "learning_rate", (1e-2, -1.0)), r"phases.learning_rate\[1\] must be a positive"),
    (lambda c: setattr(c.model, "vocab_size", 27), r"model.vocab_size \(27\) is smaller than the pydoc_topics alphabet"),
])
def test_bad_configs_are_rejected_naming_the_field(mutate, message):
    with pytest.raises(run.ConfigError, match=message):
        run.parse(_bad(mutate))


def test_window_scale_needs_sliding_window_layers():
    config = tiny_config.get_config()
    config.model.attention = dict(type="performer", num_features=8)
    config.model.attention_per_layer = {}
    config.model.relative_positions = "features"  # FAVOR+ takes TXL positions as head features only
    config.phases.window_scale = (1, 1)
    run.parse(config)
    config.phases.window_scale = (1, 2)
    with pytest.raises(run.ConfigError, match="phases.window_scale scales sliding-window layers"):
        run.parse(config)


def test_weight_decay_skips_biases_norms_and_txl_vectors():
    cfg = models.transformer_config(tiny_config.get_config().model)
    params = jax.eval_shape(models.CharLM(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    mask = steps.decay_mask(params)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): decayed
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
    }
    decayed = {name.split("/")[-1] for name, d in flat.items() if d}
    kept = {name.split("/")[-1] for name, d in flat.items() if not d}
    assert decayed == {"kernel", "relative_kernel", "embedding"}
    assert kept == {"bias", "scale", "content_bias", "position_bias"}
    assert flat["params/transformer/layer_0/attention/query/kernel"]
    assert not flat["params/transformer/layer_0/attention/query/bias"]


def test_evaluation_uses_the_windows_each_phase_trained_with():
    config = _load(CONFIG_DIR / "enwik8_small.py")
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    plan = run.parse(config)
    for phase in plan.phases:
        evaluator = char_lm.BpcEvaluator(plan.eval, None, phase, mesh)
        windows = [a.window for a in evaluator.model_config.attention]
        assert windows == [a.window for a in phase.model.attention]
        # Clipped to the training length, not widened to the 32,256-character evaluation windows.
        assert max(windows) == phase.seq_len < plan.eval.seq_len


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.model.encoder.update(dict(num_heads=3)),
     r"model.d_model \(1024\) must be divisible by model.encoder.num_heads \(3\)"),
    (lambda c: c.model.decoder.update(dict(d_ff=0)), r"model.decoder.d_ff must be a positive int"),
    (lambda c: c.model.update(dict(label_smoothing=1.5)), r"model.label_smoothing must be a number in \[0, 1\)"),
    (lambda c: c.data.update(dict(max_target_tokens=2048)),
     r"data.max_target_tokens \(2048\) must be <= model.decoder.max_positions \(1024\)"),
    (lambda c: c.decode.update(dict(num_beams=0)), r"decode.num_beams must be an int >= 1"),
    (lambda c: c.decode.update(dict(early_stopping=False, max_length=2048)),
     r"decode.max_length \(2048\) must be <= model.decoder.max_positions"),
    (lambda c: c.model.encoder.attention.update(dict(max_global_tokens=None)),
     r"model.encoder.attention.max_global_tokens \(layer 0\) must be set"),
])
def test_bad_summarization_configs_are_rejected_naming_the_field(mutate, message):
    config = _load(CONFIG_DIR / "arxiv_led.py")
    mutate(config)
    with pytest.raises(run.ConfigError, match=message):
        run.parse(config)


def test_a_summarization_config_may_leave_decode_out():
    config = _load(CONFIG_DIR / "arxiv_led.py")
    del config["decode"]
    assert run.parse(config).extra["decode"].num_beams == 1  # GenerationSettings' defaults
    config.decoding = {}
    with pytest.raises(run.ConfigError, match=r"unknown top-level field\(s\) \['decoding'\]"):
        run.parse(config)
