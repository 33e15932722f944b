"""The main job end to end on a tiny config: phases, exact resume, SIGTERM, crashes, NaN, data parallelism."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from longjax import run, tracking
from longjax.data import corpora
from longjax.run import checkpointing
from tests.train import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "train" / "tiny_config.py")


def _command(workdir, *overrides):
    return [sys.executable, "-m", "longjax.train", f"--config={TINY}", f"--workdir={workdir}", *overrides]


def _env(devices: int = 1):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(workdir, *overrides, devices=1, check=True):
    result = subprocess.run(
        _command(workdir, *overrides), env=_env(devices), capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _train_losses(workdir):
    return [(r["step"], r["loss"]) for r in tracking.read_metrics(workdir) if r["kind"] == "train"]


def _train(config, workdir):
    return run.train(run.parse(config), workdir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One complete single-device run of the tiny config, in a subprocess like a user's."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = _run(workdir)
    return workdir, result


def test_training_runs_both_phases_and_the_loss_falls(uninterrupted):
    workdir, result = uninterrupted
    losses = _train_losses(workdir)
    assert [step for step, _ in losses] == list(range(1, 11))
    assert np.mean([loss for _, loss in losses[-3:]]) < np.mean([loss for _, loss in losses[:3]])
    records = tracking.read_metrics(workdir)
    lr = {r["step"]: r["learning_rate"] for r in records if r["kind"] == "train"}
    # Warmup restarts each phase; the phase-2 rate is half the phase-1 rate.
    assert [lr[s] for s in range(1, 11)] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2, 2.5e-3, 5e-3, 5e-3, 5e-3])
    phases = {r["step"]: r["phase"] for r in records if r["kind"] == "train"}
    assert phases[6] == 1 and phases[7] == 2
    assert "phase 2/2: steps 6-10, seq_len 32, batch 4, lr 0.005 (warmup 2), windows [8, 16]" in result.stdout
    assert "final validation BPC" in result.stdout
    assert (workdir / "curves.png").stat().st_size > 0
    assert list((workdir / "tensorboard").iterdir())
    assert json.loads((workdir / "config.json").read_text())["phases"]["seq_len"] == [16, 32]


def test_phase_change_doubles_windows_and_length_and_halves_the_rate():
    first, second = run.parse(tiny_config.get_config()).phases
    assert second.seq_len == 2 * first.seq_len
    assert second.learning_rate == first.learning_rate / 2
    assert [a.window for a in second.model.attention] == [2 * a.window for a in first.model.attention]


def test_sigkill_and_resume_give_bitwise_identical_losses(uninterrupted, tmp_path):
    expected = _train_losses(uninterrupted[0])
    process = subprocess.Popen(_command(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            steps = [s for s, _ in _train_losses(tmp_path)] if (tmp_path / "metrics.jsonl").exists() else []
            if steps and steps[-1] >= 5:
                break
            assert process.poll() is None, process.stdout.read().decode()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = _train_losses(tmp_path)[-1][0]
    assert killed_at < 10, "the run finished before it could be killed"
    result = _run(tmp_path)
    assert "resumed from the checkpoint at step" in result.stdout
    assert _train_losses(tmp_path) == expected  # bitwise: floats compared exactly


def test_sigterm_saves_and_exits_zero_then_resumes(uninterrupted, tmp_path):
    process = subprocess.Popen(_command(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (tmp_path / "metrics.jsonl").exists() and _train_losses(tmp_path)
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM: saved the checkpoint at step" in output
    saved = checkpointing.Checkpointer(tmp_path, keep=3, async_save=False)
    stopped_at = _train_losses(tmp_path)[-1][0]
    assert saved.steps()[-1] == stopped_at
    saved.close()
    _run(tmp_path)
    assert _train_losses(tmp_path) == _train_losses(uninterrupted[0])


def test_half_written_and_unreadable_checkpoints_are_skipped(tmp_path):
    config = tiny_config.get_config()
    config.phases.steps = (4, 2)
    _train(config, tmp_path)
    first_losses = _train_losses(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    # A crash mid-save leaves orbax's temporary directory ...
    (checkpoints / "9.orbax-checkpoint-tmp-1234").mkdir()
    (checkpoints / "9.orbax-checkpoint-tmp-1234" / "state").write_text("partial")
    # ... and a lost or damaged file leaves a listed step that does not restore.
    shutil.rmtree(checkpoints / "6" / "state")
    (checkpoints / "6" / "state").mkdir()
    result = _train(config, tmp_path)
    assert result.status == "finished" and result.step == 6
    # Resumed from step 4, set step 6 aside, and re-ran steps 5-6 exactly.
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unreadable").iterdir()] == ["6"]
    assert _train_losses(tmp_path) == first_losses


def test_a_changed_model_shape_is_refused_before_anything_is_touched(tmp_path):
    config = tiny_config.get_config()
    config.phases.steps = (2, 1)
    _train(config, tmp_path)
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    wider = tiny_config.get_config()
    wider.phases.steps = (2, 1)
    wider.model.d_model = 48
    with pytest.raises(run.ConfigChangedError, match=r"model.d_model: 32 -> 48"):
        _train(wider, tmp_path)
    # Allowed config changes still cannot load other shapes: an error, not a fresh start.
    wider.allow_config_change = True
    with pytest.raises(run.CheckpointError, match="none restores"):
        _train(wider, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    assert not (tmp_path / "checkpoints_unreadable").exists()


def test_resuming_with_a_changed_config_is_refused_unless_allowed(tmp_path):
    config = tiny_config.get_config()
    config.phases.steps = (2, 1)
    _train(config, tmp_path)
    changed = tiny_config.get_config()
    changed.phases.steps = (2, 3)
    changed.model.dropout = 0.3
    with pytest.raises(run.ConfigChangedError, match=r"model.dropout: 0.1 -> 0.3; phases.steps: \(2, 1\) -> \(2, 3\)"):
        _train(changed, tmp_path)
    changed.allow_config_change = True
    result = _train(changed, tmp_path)
    assert result.step == 5


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config.get_config()
    config.phases.learning_rate = (1e30, 1e30)
    config.optimizer.max_warmup_steps = 0
    config.checkpoint.every_steps = 1
    with pytest.raises(run.NonFiniteLossError, match=r"the training loss is (nan|inf) at step (\d+)") as error:
        _train(config, tmp_path)
    bad_step = int(str(error.value).split(" at step ")[1].split()[0])
    saved = checkpointing.Checkpointer(tmp_path, keep=3, async_save=False)
    assert saved.steps() and saved.steps()[-1] == bad_step - 1
    saved.close()
    assert f"Last good checkpoint: step {bad_step - 1}" in str(error.value)


def test_missing_data_fails_at_start_naming_the_file(tmp_path):
    config = tiny_config.get_config()
    config.data.update(dict(name="enwik8", dir=str(tmp_path / "data"), download=False))
    with pytest.raises(corpora.CorpusNotFoundError, match=r"enwik8") as error:
        _train(config, tmp_path / "run")
    assert str(tmp_path / "data") in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_fails_before_anything_else(tmp_path):
    result = _run(tmp_path / "run", "--config.phases.steps=(6,)", check=False)
    assert result.returncode == 1
    assert "phases lists must have equal lengths" in result.stderr
    assert not (tmp_path / "run").exists()


MESH_2X2X2 = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.sequence=2")


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """The tiny config on 8 devices: 2 data x 2 fsdp x 2 sequence."""
    workdir = tmp_path_factory.mktemp("mesh_2x2x2")
    return workdir, _run(workdir, *MESH_2X2X2, devices=8)


def _assert_same_losses(got, want):
    # Float32 rounding: the sharded sums (batch over 4 devices, sequence halves, parameters
    # gathered) add in another order. Measured: 4.8e-7 at most on 10 steps.
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=2e-5, atol=2e-5)


def test_a_data_fsdp_sequence_mesh_trains_like_one_device(uninterrupted, mesh_run):
    workdir, result = mesh_run
    _assert_same_losses(_train_losses(workdir), _train_losses(uninterrupted[0]))
    # The state is split over fsdp: each device holds about half (small vectors stay whole).
    placement = re.search(r"mesh data 2 x fsdp 2 x sequence 2: parameters and optimizer state "
                          r"([\d.]+) MiB per device of ([\d.]+) MiB", result.stdout)
    assert placement, result.stdout
    per_device, whole = map(float, placement.groups())
    assert per_device < 0.55 * whole


def test_a_checkpoint_resumes_onto_another_mesh_shape(uninterrupted, mesh_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(mesh_run[0], workdir)
    for step in (8, 10):  # back to the checkpoint at step 6, the end of phase 1
        shutil.rmtree(workdir / checkpointing.CHECKPOINT_DIR / str(step))
    # Phase 2 on 4 sequence shards of 8 positions: its windows (8, 16) reach two shards back.
    result = _run(workdir, "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.sequence=4", devices=8)
    assert "resumed from the checkpoint at step 6" in result.stdout
    assert "mesh data 1 x fsdp 2 x sequence 4" in result.stdout
    _assert_same_losses(_train_losses(workdir), _train_losses(uninterrupted[0]))


def test_a_mesh_that_does_not_fit_the_devices_is_one_error_line(tmp_path):
    result = _run(tmp_path / "run", "--config.mesh.fsdp=3", devices=4, check=False)
    line = _one_error_line(result)
    assert "mesh.data (-1) x mesh.fsdp (3) x mesh.sequence (1) must be the number of devices (4)" in line


def test_standalone_evaluation_scores_each_character_once(uninterrupted):
    workdir, _ = uninterrupted
    result = run.evaluate_checkpoint(workdir, "test", limit=300)
    assert result["step"] == 10 and result["phase"] == 2
    assert result["chars"] == 299 and np.isfinite(result["bpc"])


def _one_error_line(result) -> str:
    """The run's stderr is exactly one `error:` line: no traceback, no background thread's complaint."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_unrestorable_checkpoints_fail_in_one_line_and_touch_nothing(tmp_path):
    config = tiny_config.get_config()
    config.phases.steps = (2, 1)
    _train(config, tmp_path)
    for step in (2, 3):
        # Every array of every checkpoint lost: the reads fail in orbax's background machinery.
        shutil.rmtree(tmp_path / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = _run(tmp_path, "--config.phases.steps=(2,1)", check=False)
    line = _one_error_line(result)
    assert "holds checkpoints but none restores (step 3: " in line and "; step 2: " in line
    assert "Nothing was changed" in line and "another --workdir" in line
    assert "TensorStore" not in line and len(line) < 1000
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    verbose = _run(tmp_path, "--config.phases.steps=(2,1)", "--verbose", check=False)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    # The same error line last (which array's read fails first varies between runs).
    assert verbose.stderr.strip().splitlines()[-1].startswith(line.split(" (step 3: ")[0])


def test_a_bad_attention_option_names_its_config_path_before_anything_is_written(tmp_path):
    result = _run(tmp_path / "run", "--config.model.attention_per_layer.window=(4,-32)", check=False)
    line = _one_error_line(result)
    assert "model.attention_per_layer.window[1]" in line and "-32" in line
    assert not (tmp_path / "run").exists()


def test_two_processes_on_localhost_train_like_one(uninterrupted, tmp_path):
    """`jax.distributed` with a local coordinator and CPU collectives: 2 processes x 2 devices,
    2 data x 2 sequence, one shared workdir."""
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    distributed = (
        "--config.mesh.distributed=True", f"--config.mesh.coordinator_address=localhost:{port}",
        "--config.mesh.num_processes=2", "--config.mesh.sequence=2",
    )
    processes = [
        subprocess.Popen(
            _command(tmp_path, *distributed, f"--config.mesh.process_id={i}"), env=_env(2),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in processes] == [0, 0], "\n\n".join(outputs)
    # Process 0 logs; the other only trains.
    assert "final validation BPC" in outputs[0] and "final validation BPC" not in outputs[1]
    _assert_same_losses(_train_losses(tmp_path), _train_losses(uninterrupted[0]))
