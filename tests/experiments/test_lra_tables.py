"""`experiments/lra_tables.py --smoke`: both LRA tables from real (tiny) runs, CSV and PNG written."""

import csv
import math
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "lra_tables.py"


def test_smoke_mode_trains_scores_and_tabulates(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--attentions=full,sliding_window", "--lengths=128",
         f"--workdir-root={tmp_path / 'runs'}", f"--out={out}"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| Transformer | " in result.stdout and "| Longformer | " in result.stdout
    assert "(36.37)" in result.stdout  # the paper's ListOps accuracy of the Transformer, beside ours
    with (out / "lra_accuracy_smoke.csv").open() as f:
        accuracy = list(csv.DictReader(f))
    assert [r["attention"] for r in accuracy] == ["full", "sliding_window"]
    assert {r["status"] for r in accuracy} == {"ok"}
    for row in accuracy:
        assert 0 <= float(row["accuracy"]) <= 100 and int(row["steps"]) == 4
        assert float(row["steps_per_second"]) > 0 and float(row["peak_memory_mib"]) > 0
    with (out / "lra_efficiency_smoke.csv").open() as f:
        efficiency = {r["attention"]: r for r in csv.DictReader(f)}
    assert {r["status"] for r in efficiency.values()} == {"ok"}
    assert float(efficiency["full"]["speed_vs_full"]) == 1.0
    assert math.isfinite(float(efficiency["sliding_window"]["memory_vs_full"]))
    assert (out / "lra_efficiency_smoke.png").stat().st_size > 0


def test_later_overrides_replace_earlier_ones():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import lra_tables
    finally:
        sys.path.remove(str(SCRIPT.parent))
    flags = ["--config.phases.batch_size=(32,)", "--config.model.d_model=256", "--config.phases.batch_size=(8,)"]
    assert lra_tables.merged_overrides(flags) == ["--config.model.d_model=256", "--config.phases.batch_size=(8,)"]
