"""The LRA tasks: every config plans, bad configs are named, a tiny ListOps run learns, Retrieval reads pairs."""

import collections
import importlib.util
import pathlib

import numpy as np
import pytest

from longjax import run, sections
from longjax.data import lra_listops

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
ATTENTIONS = ("full", "sliding_window", "block_sparse", "performer")


def _config(task, attention):
    path = CONFIG_DIR / f"lra_{task}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(attention)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_task_and_attention_plans(task, attention):
    plan = run.parse(_config(task, attention))
    model = plan.phases[0].model
    assert plan.task == f"lra_{task}"
    assert len(plan.phases) == 1 and model.pair == (task == "retrieval")
    kinds = {type(a).__name__ for a in model.attention}
    assert kinds == {{"full": "FullAttention", "sliding_window": "SlidingWindowAttention",
                      "block_sparse": "BlockSparseAttention", "performer": "PerformerAttention"}[attention]}
    # Longformer's global attention sits on the pooled token whenever the first token is pooled.
    assert model.global_first_token == (attention == "sliding_window" and model.pooling == "cls")


def test_the_published_sizes():
    listops = run.parse(_config("listops", "full"))
    model, phase = listops.phases[0].model, listops.phases[0]
    assert (model.num_layers, model.num_heads, model.d_model, model.d_ff) == (4, 8, 512, 1024)
    assert (phase.seq_len, phase.batch_size, phase.steps, phase.warmup_steps) == (2000, 32, 5000, 1000)
    # LRA's 0.05 * rsqrt(max(step, warmup)): the peak is 0.05 / sqrt(1000).
    np.testing.assert_allclose(phase.learning_rate, 0.05 / 1000**0.5)
    text = run.parse(_config("text", "performer")).phases[0]
    assert (text.seq_len, text.model.d_model, text.steps) == (4000, 256, 20_000)
    retrieval = run.parse(_config("retrieval", "block_sparse")).phases[0]
    # Its 5,000 steps end inside LRA's 8,000-step warmup: the rate only rises, to 5/8 of the warmup's peak.
    np.testing.assert_allclose(retrieval.learning_rate, 0.05 / 8000**0.5 * 5 / 8)
    assert retrieval.warmup_steps == 5000
    image = run.parse(_config("image", "sliding_window")).phases[0]
    assert (image.model.num_layers, image.model.pooling, image.batch_size) == (4, "mean", 256)
    assert image.model.position == "learned" and listops.phases[0].model.position == "sinusoidal"
    # LRA's Performers: deterministic ReLU features (its default), softmax with 2 features on ListOps.
    performer = run.parse(_config("text", "performer")).phases[0].model.attention[0]
    assert (performer.feature_map, performer.random_features, performer.num_features) == ("relu", False, 64)
    performer = run.parse(_config("listops", "performer")).phases[0].model.attention[0]
    assert (performer.feature_map, performer.random_features, performer.num_features) == ("softmax", True, 2)
    pathfinder = run.parse(_config("pathfinder", "full")).phases[0]
    assert (pathfinder.seq_len, pathfinder.model.pooling, pathfinder.steps) == (1024, "mean", 200 * 312)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.update(dict(vocab_size=300)), "model.vocab_size must be 257 for lra_image"),
    (lambda c: c.model.update(dict(num_labels=2)), "model.num_labels must be 10 for lra_image"),
    (lambda c: c.phases.update(dict(seq_len=(512,))), "phases.seq_len must be 1024 for lra_image"),
    (lambda c: c.model.update(dict(max_positions=1025)),
     r"model.max_positions \(1025\) must exceed the encoder's length \(1025: phases.seq_len 1024, plus 1 for the "
     r"CLS token"),
    (lambda c: c.model.update(dict(position="txl_relative")), "model.position"),
])
def test_bad_configs_name_the_field(change, message):
    config = _config("image", "full")
    change(config)
    with pytest.raises(sections.ConfigError, match=message):
        run.parse(config)


def _tiny(config, data_dir, *, seq_len, steps, batch_size=32):
    config.data.dir = str(data_dir)
    config.model.update(dict(num_layers=2, num_heads=4, d_model=64, d_ff=128, classifier_dim=64, dropout=0.0,
                             attention_dropout=0.0))
    config.phases.update(dict(seq_len=(seq_len,), batch_size=(batch_size,), steps=(steps,), learning_rate=(2e-3,)))
    config.optimizer.update(dict(warmup_fraction=0.1, max_warmup_steps=50, decay="constant", weight_decay=0.0))
    config.checkpoint.update(dict(every_steps=10**6, async_save=False))
    config.eval.every_steps = None
    config.log_every_steps = 50
    return config


def test_a_tiny_listops_run_beats_the_majority_class(tmp_path):
    # Shallow expressions of at most 48 tokens: learnable in a CPU minute, unlike LRA's depth 10.
    lra_listops.generate_files(tmp_path / "data", seed=0, train=2000, validation=256, test=32, max_depth=2,
                               max_args=4, min_length=4, max_length=48)
    labels = [target for _, target in lra_listops.read_tsv(tmp_path / "data" / "basic_val.tsv")]
    majority = max(collections.Counter(labels).values()) / len(labels)
    config = _tiny(_config("listops", "sliding_window"), tmp_path / "data", seq_len=64, steps=150)
    config.model.attention.window = 8
    result = run.train(run.parse(config), tmp_path / "run")
    accuracy = result.final_metrics["accuracy"]
    # 256 validation examples: chance would need about 4 standard deviations to reach this margin.
    assert accuracy > majority + 0.1, (accuracy, majority)
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"steps_per_second"' in records and '"peak_memory_mib"' in records


def test_retrieval_trains_on_pairs_in_the_aan_format(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "aan"
    data.mkdir()
    for split, name in (("train", "train"), ("validation", "eval"), ("test", "test")):
        lines = []
        for i in range(16):
            a, b = (bytes(rng.integers(97, 123, int(rng.integers(5, 40))).astype(np.uint8)) for _ in range(2))
            lines.append(b"\t".join([b"%d" % (i % 2), b"doc%d" % i, b"doc%d" % (i + 1), a, b]))
        (data / f"new_aan_pairs.{name}.tsv").write_bytes(b"\n".join(lines) + b"\n")
    config = _tiny(_config("retrieval", "full"), data, seq_len=32, steps=3, batch_size=8)
    result = run.train(run.parse(config), tmp_path / "run")
    assert result.final_metrics["examples"] == 16
    assert 0.0 <= result.final_metrics["accuracy"] <= 1.0
