"""Tasks plug into the one training run: selected by name, a task from outside longjax trains, resumes and evaluates."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from longjax import run, tasks, tracking
from tests.train import tiny_config, toy_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_tasks_are_selected_by_module_name():
    assert "char_lm" in tasks.available()
    assert tasks.get("char_lm") is tasks.get("char_lm")
    assert isinstance(tasks.get("tests.train.toy_task"), tasks.Task)
    with pytest.raises(run.ConfigError, match=r"task must be one of \['char_lm'.*got 'char_llm'"):
        tasks.get("char_llm")
    with pytest.raises(run.ConfigError, match="must define TASK"):
        tasks.get("tests.train.toy_config")
    with pytest.raises(run.ConfigError, match="task must be a task module's name"):
        tasks.get("no such task")


def test_a_task_section_is_typed_by_the_task():
    config = toy_config.get_config()
    config.data.vocab = 0
    with pytest.raises(run.ConfigError, match=r"data.vocab must be a positive int, got 0"):
        run.parse(config)
    config = toy_config.get_config()
    config.eval.max_chars = 10  # a char_lm field the toy task's eval section does not have
    with pytest.raises(run.ConfigError, match=r"eval: unknown field\(s\) \['max_chars'\]"):
        run.parse(config)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toy")
    result = run.train(run.parse(toy_config.get_config()), workdir)
    return workdir, result


def test_a_task_from_outside_longjax_trains_with_its_own_metrics(toy_run):
    workdir, result = toy_run
    assert result.status == "finished" and result.step == 9
    assert set(result.final_metrics) == {"accuracy", "examples"}
    records = tracking.read_metrics(workdir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 9]
    assert all(0 <= r["accuracy"] <= 1 and "bpc" not in r for r in train)
    evals = [(r["step"], r["split"]) for r in records if r["kind"] == "eval"]
    # Every 4 steps, and at each phase end.
    assert evals == [(4, "validation"), (6, "validation"), (8, "validation"), (9, "validation")]
    assert (workdir / "curves.png").stat().st_size > 0


def test_the_task_resumes_and_evaluates_from_the_command_line(toy_run):
    workdir, _ = toy_run
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    again = subprocess.run(
        [sys.executable, "-m", "longjax.train", f"--config={REPO / 'tests/train/toy_config.py'}",
         f"--workdir={workdir}"], env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "nothing to do: the run in this workdir finished at step 9" in again.stdout
    evaluated = subprocess.run(
        [sys.executable, "-m", "longjax.evaluate", f"--workdir={workdir}", "--split=test", "--limit=20"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "step 9 (phase 2) | test accuracy" in evaluated.stdout and "over 20 examples" in evaluated.stdout
    saved = json.loads((workdir / "eval_test_9.json").read_text())
    assert saved["task"] == "tests.train.toy_task" and saved["examples"] == 20
    assert 0 <= saved["accuracy"] <= 1
    bad = subprocess.run(
        [sys.executable, "-m", "longjax.evaluate", f"--workdir={workdir}", "--split=dev"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: split must be one of the tests.train.toy_task task's ['train', 'validation', 'test'], got 'dev'"
    ]


def _finetune_config(source, **attention):
    config = toy_config.get_config()
    config.init_from = str(source)
    config.seed = 5
    config.model.attention.update(attention)
    return config


def test_init_from_takes_parameters_only_and_reports_what_it_took(toy_run, tmp_path):
    source, _ = toy_run
    with run.setup(run.parse(toy_config.get_config()), source, evaluate=True) as saved:
        trained = saved.state.params
    # The new model has Longformer's global projections, which the source run lacks.
    plan = run.parse(_finetune_config(source, global_projections=True))
    with run.setup(plan, tmp_path) as started:
        assert started.origin == "init_from" and started.step == 0 and int(started.state.step) == 0
        params = started.state.params["params"]["encoder"]
        np.testing.assert_array_equal(params["embed"]["embedding"], trained["params"]["encoder"]["embed"]["embedding"])
        layer = params["transformer"]["layer_0"]["attention"]
        np.testing.assert_array_equal(
            layer["query"]["kernel"], trained["params"]["encoder"]["transformer"]["layer_0"]["attention"]["query"]["kernel"]
        )
        assert "global_query" in layer
        # The optimizer starts fresh: Adam's moments are zero.
        assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(started.state.opt_state))
        (note,) = started.notes
        assert note.startswith(f"init_from: 38 of 50 parameter arrays from checkpoint 9 in {source / 'checkpoints'}")
        # The 12 arrays fresh: 2 layers x 3 global projections x (kernel, bias).
        assert "; initialised fresh: params/encoder/transformer/layer_0/attention/global_key/bias" in note
        assert note.endswith("and 6 more") and "not used" not in note
    assert not (tmp_path / "config.json").exists()  # setup writes nothing but the checkpoint directory


def test_init_from_refuses_other_shapes_and_unrelated_checkpoints(toy_run, tmp_path):
    source, _ = toy_run
    config = _finetune_config(source)
    config.model.d_ff = 48
    with pytest.raises(run.InitFromError, match=r"have other shapes than this model's \(params/encoder/transformer/layer_0/mlp"):
        run.setup(run.parse(config), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(run.InitFromError, match="holds no checkpoint|is not a directory"):
        run.setup(run.parse(_finetune_config(tmp_path / "nothing")), tmp_path / "b")
    # A character LM shares no parameter path with the classifier.
    char_lm = tiny_config.get_config()
    char_lm.init_from = str(source)
    with pytest.raises(run.InitFromError, match=r"holds none of this model's \d+ parameters"):
        run.setup(run.parse(char_lm), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_the_runs_own_checkpoint_comes_before_init_from(toy_run, tmp_path):
    source, _ = toy_run
    config = _finetune_config(source)
    config.phases.steps = (2, 1)
    run.train(run.parse(config), tmp_path)
    with run.setup(run.parse(config), tmp_path) as resumed:
        assert resumed.origin == "resumed" and resumed.step == 3
        assert resumed.notes[1] == f"init_from ({source}) not used: the run's own checkpoint comes first"
