"""The Table 4 ablation configs hold the paper's schedules and plan; the script's smoke run trains, tabulates and resumes."""

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

from configs import enwik8_small, text8_ablations, text8_small
from longjax import run

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "longformer_ablations.py"
WINDOW_VARIANTS = ("decreasing", "fixed", "increasing")


def _windows(variant, smoke=False):
    return text8_ablations.get_config(f"{variant},smoke" if smoke else variant).model.attention_per_layer.window


def _mean(values):
    return sum(values) / len(values)


def test_the_window_schedules_are_table_4s():
    increasing, decreasing, fixed = _windows("increasing"), _windows("decreasing"), _windows("fixed")
    assert len(increasing) == 12
    assert (increasing[0], increasing[-1]) == (32, 512)
    assert all(a < b for a, b in zip(increasing, increasing[1:]))
    assert decreasing == increasing[::-1]
    assert fixed == (230,) * 12
    # "the average of window sizes of the other configuration": the three cost the same.
    assert abs(_mean(increasing) - 230) < 0.5 and _mean(decreasing) == _mean(increasing)


def test_the_smoke_schedules_keep_the_shape():
    increasing, decreasing, fixed = (_windows(v, smoke=True) for v in ("increasing", "decreasing", "fixed"))
    assert len(increasing) == 3 and (increasing[0], increasing[-1]) == (4, 64)
    assert increasing[0] < increasing[1] < increasing[2] and decreasing == increasing[::-1]
    assert fixed == (29,) * 3 and abs(_mean(increasing) - 29) < 1


def test_dilation_is_the_recipes_and_only_on_the_dilation_variant():
    config = text8_ablations.get_config("dilation")
    assert config.model.attention_per_layer.window == _windows("increasing")
    assert config.model.attention_per_layer.dilation == enwik8_small.get_config().model.attention_per_layer.dilation
    for variant in ("decreasing", "fixed", "increasing", "no_dilation"):
        assert text8_ablations.get_config(variant).model.attention_per_layer.dilation == (1,) * 12
    # The table's "No Dilation" row is the increasing run.
    assert text8_ablations.get_config("no_dilation").to_dict() == text8_ablations.get_config("increasing").to_dict()
    smoke = text8_ablations.get_config("dilation,smoke").model.attention_per_layer.dilation
    assert smoke == (1, (1, 1, 2, 2), (1, 1, 4, 4))  # 2 heads of the upper layers, growing as in the recipe


@pytest.mark.parametrize("arg", [f"{v}{s}" for v in text8_ablations.VARIANTS for s in ("", ",smoke")])
def test_every_variant_plans_one_phase_1(arg):
    config = text8_ablations.get_config(arg)
    plan = run.parse(config)
    (phase,) = plan.phases
    windows = config.model.attention_per_layer.window
    assert [layer.window for layer in phase.model.attention] == list(windows)
    if arg.endswith("smoke"):
        assert plan.data.name == "pydoc_topics" and phase.model.num_layers == 3
        return
    small = text8_small.get_config()
    assert plan.data.name == "text8" and config.model.vocab_size == 27
    assert (phase.seq_len, phase.batch_size, phase.steps) == (2048, 32, 150_000)
    assert (phase.learning_rate, phase.warmup_steps) == (2.5e-4, 10_000)
    assert (phase.model.num_layers, phase.model.num_heads, phase.model.d_model) == (12, 8, 512)
    for field in ("dropout", "position", "layer_norm", "activation", "d_ff"):
        assert config.model[field] == small.model[field]
    assert config.eval.to_dict() == small.eval.to_dict()


def test_a_bad_variant_is_named():
    with pytest.raises(ValueError, match=r"one of \['decreasing', 'fixed', 'increasing', 'no_dilation', 'dilation'\]"):
        text8_ablations.get_config("wider")
    with pytest.raises(ValueError, match="',smoke'"):
        text8_ablations.get_config("fixed,tiny")


def _script(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600, cwd=REPO,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    # Three of the five rows (two runs: no_dilation is the increasing run) keep the suite short; every
    # variant's config is checked above.
    done = _script("--smoke", "--workdir-root", root / "runs", "--out", root / "results",
                   "--variants", "fixed,increasing,no_dilation")
    assert done.returncode == 0, done.stdout + done.stderr
    return root, done.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_smoke_run_trains_each_config_once_and_tabulates(smoke):
    root, stdout = smoke
    # no_dilation is the increasing run: two runs for three rows.
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["fixed", "increasing"]
    rows = _rows(root / "results" / "longformer_ablations_smoke.csv")
    assert [r["variant"] for r in rows] == ["fixed", "increasing", "no_dilation"]
    assert [r["paper_dev_bpc"] for r in rows] == ["1.23", "1.21", "1.21"]
    assert all(math.isfinite(float(r["dev_bpc"])) and r["steps"] == "20" and r["dev_chars"] == "4095" for r in rows)
    assert rows[1]["dev_bpc"] == rows[2]["dev_bpc"] and rows[2]["run"] == "increasing"
    assert rows[1]["windows"] == "4 18 64" and rows[2]["dilation"] == "1 1 1"
    assert (root / "results" / "longformer_ablations_smoke.png").stat().st_size > 0
    # The paper's layout, honest about what was trained.
    assert "SMOKE RUN" in stdout and "Trained 20 steps of phase 1 (the paper: 150,000" in stdout
    table = stdout[stdout.index("| Model |"):]
    for row in rows:
        assert f"| {row['model']} | 20 | {float(row['paper_dev_bpc']):.2f} | {float(row['dev_bpc']):.4f} |" in table
    assert "| Increasing w (from 4 to 64) |" in table and "| | | | |" in table and "Decreasing" not in table


def test_a_rerun_resumes_nothing_and_evaluate_agrees_with_training(smoke):
    root, _ = smoke
    done = _script("--smoke", "--workdir-root", root / "runs", "--out", root / "rerun", "--variants", "fixed",
                   "--dev-bpc", "evaluate", "--eval-limit", 4096)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to do: the run in this workdir finished at step 20" in done.stdout
    (row,) = _rows(root / "rerun" / "longformer_ablations_smoke.csv")
    (trained,) = [r for r in _rows(root / "results" / "longformer_ablations_smoke.csv") if r["variant"] == "fixed"]
    assert row["dev_chars"] == "4095" and float(row["dev_bpc"]) == pytest.approx(float(trained["dev_bpc"]), abs=1e-6)
    assert (root / "runs" / "fixed" / "ablation_dev_bpc.json").exists()


def test_bad_arguments_are_refused():
    done = _script("--smoke", "--variants", "wider")
    assert done.returncode == 2 and "--variants: ['wider']" in done.stderr
    done = _script("--smoke", "--config.phases.steps=5")
    assert done.returncode == 2 and "set from --scale" in done.stderr
