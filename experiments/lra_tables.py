"""Long Range Arena on longjax: the LRA paper's Table 1 (accuracy) and Table 2 (speed and memory), side by side.

    python experiments/lra_tables.py accuracy --workdir-root runs/lra [--tasks listops,pathfinder]
        [--attentions full,sliding_window,block_sparse,performer] [--scale 0.1] [--split test]
        [--override=--config.data.dir=...]
    python experiments/lra_tables.py efficiency --workdir-root runs/lra_efficiency
        [--lengths 1024,2048,3072,4096] [--steps 20]
    python experiments/lra_tables.py --smoke --workdir-root /tmp/lra_smoke     # a minute or two, for the tests

* `accuracy` trains each task x attention with `python -m longjax.train
  --config=configs/lra_<task>.py:<attention>` in `<root>/<task>/<attention>`
  (rerunning resumes), `--scale` times its steps, then scores `--split` with
  `python -m longjax.evaluate`, and prints accuracy per task in LRA's Table 1
  layout with the paper's numbers beside ours, plus each run's training steps
  per second and peak memory (from its metrics.jsonl). ListOps and
  Pathfinder need their generated files (`python -m longjax.data.lra_listops
  --out=...`, `python -m longjax.data.lra_pathfinder --out=...`); Text,
  Retrieval and Image need the real data (see the configs). A scaled run
  keeps LRA's warmup in steps (up to the run's length): for ListOps and Text
  (rsqrt decay) it is the first steps of LRA's run; Retrieval's warmup and the
  image tasks' cosine are compressed to the shorter run. A run that fails
  is a row saying why; the others go on.
* `efficiency` is LRA's Table 2: the Text task's model (4 layers, 256 wide,
  batch 32) trained for `--steps` steps at each length, for each attention;
  median steps per second and peak memory, and both relative to full
  attention. The data only has to have the right shape, so it trains on
  ListOps examples generated into `<root>/data` (cut or padded to each
  length), which needs no download. LRA's own Table 2 was measured on TPU
  v3 chips; compare ratios, not steps per second.
* `--smoke` runs both (validation accuracy, lengths 128 and 256) on a 1-layer
  16-wide model and generated ListOps of at most 256 tokens, 4 and 3 steps a run.

Peak memory is what the run logs (`longjax.run.hooks.peak_memory_bytes`): the
device's peak on GPU/TPU, the process's peak resident memory on the CPU
(which includes the Python process and the data, so compare ratios there).
Writes `lra_accuracy.csv` / `lra_efficiency.csv` and a PNG beside them under `--out`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys

import bench_common

from longjax import tracking

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
ATTENTIONS = ("full", "sliding_window", "block_sparse", "performer")
NAMES = {"full": "Transformer", "sliding_window": "Longformer", "block_sparse": "BigBird", "performer": "Performer"}
# LRA paper (Tay et al. 2021), Table 1: test accuracy (%) of the models run here.
PAPER_ACCURACY = {
    "full": {"listops": 36.37, "text": 64.27, "retrieval": 57.46, "image": 42.44, "pathfinder": 71.40},
    "sliding_window": {"listops": 35.63, "text": 62.85, "retrieval": 56.89, "image": 42.22, "pathfinder": 69.71},
    "block_sparse": {"listops": 36.05, "text": 64.02, "retrieval": 59.29, "image": 40.83, "pathfinder": 74.87},
    "performer": {"listops": 18.01, "text": 65.40, "retrieval": 53.82, "image": 42.77, "pathfinder": 77.05},
}
# The smoke mode's model: small enough for seconds per run, every pattern still sparse at its length.
SMOKE_MODEL = [
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.d_model=16",
    "--config.model.d_ff=32", "--config.model.classifier_dim=16", "--config.phases.batch_size=(8,)",
    "--config.eval.batch_size=32", "--config.log_every_steps=1", "--config.checkpoint.async_save=False",
]
SMOKE_ATTENTION = {
    "full": [],
    "sliding_window": ["--config.model.attention.window=16"],
    "block_sparse": ["--config.model.attention.block_size=16"],
    "performer": [],
}


def task_config(task: str, attention: str):
    """`configs/lra_<task>.py:<attention>`'s config, as the runs get it."""
    path = REPO / "configs" / f"lra_{task}.py"
    spec = importlib.util.spec_from_file_location(f"lra_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(attention)


def merged_overrides(flags: list[str]) -> list[str]:
    """`--config.<field>=<value>` flags with one per field, the last given winning.

    ml_collections does not let a repeated override replace the first (a
    repeated tuple field is refused), so later layers of overrides (the smoke
    model's, the user's) replace earlier ones here.
    """
    by_field = {}
    for flag in flags:
        field = flag.split("=", 1)[0]
        by_field.pop(field, None)
        by_field[field] = flag
    return list(by_field.values())


def _train(config: str, workdir: pathlib.Path, overrides: list[str]) -> str | None:
    """Runs (or resumes) one training run; None when it finished, else why it failed (its last output line)."""
    command = [sys.executable, "-m", "longjax.train", f"--config={config}", f"--workdir={workdir}",
               *merged_overrides(overrides)]
    print("$", " ".join(command), flush=True)
    finished = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(finished.stdout, end="", flush=True)
    if finished.returncode == 0:
        return None
    lines = [line for line in finished.stdout.splitlines() if line.strip()]
    return f"failed (exit {finished.returncode}): {lines[-1] if lines else 'no output'}"


def _evaluate(workdir: pathlib.Path, split: str) -> dict:
    command = [sys.executable, "-m", "longjax.evaluate", f"--workdir={workdir}", f"--split={split}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
    newest = max(workdir.glob(f"eval_{split}_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return json.loads(newest.read_text())


def training_records(workdir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    records = tracking.read_metrics(workdir)
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def speed_and_memory(workdir: pathlib.Path) -> tuple[float, float, str]:
    """(median steps per second, peak memory MiB, memory source) of a run's training records.

    The first record's interval holds the compilation, so it is left out
    when there are others.
    """
    train, _ = training_records(workdir)
    if not train:
        raise ValueError(f"{workdir}/metrics.jsonl holds no training record")
    timed = train[1:] if len(train) > 1 else train
    source = "device" if train[-1].get("peak_memory_on_device") else "host_rss"
    return (statistics.median(r["steps_per_second"] for r in timed), max(r["peak_memory_mib"] for r in train),
            source)


def accuracy(args) -> list[dict]:
    """Trains and scores every task x attention; returns the rows of the CSV."""
    rows = []
    for task in args.tasks:
        for attention in args.attentions:
            workdir = args.workdir_root / task / attention
            steps = max(1, round(task_config(task, attention).phases.steps[0] * args.scale))
            overrides = [f"--config.phases.steps=({steps},)", *args.override, *args.attention_override[attention]]
            failure = _train(f"configs/lra_{task}.py:{attention}", workdir, overrides)
            if failure is not None:
                rows.append({"task": task, "attention": attention, "steps": steps, "split": args.split,
                             "accuracy": float("nan"), "paper_accuracy": PAPER_ACCURACY[attention][task],
                             "steps_per_second": float("nan"), "peak_memory_mib": float("nan"),
                             "memory_source": "", "status": failure})
                continue
            if args.split == "validation":
                _, evals = training_records(workdir)
                result = {k: v for k, v in evals[-1].items() if k not in ("kind", "time")}
            else:
                result = _evaluate(workdir, args.split)
            speed, memory, source = speed_and_memory(workdir)
            rows.append({"task": task, "attention": attention, "steps": steps, "split": args.split,
                         "accuracy": 100 * result["accuracy"], "paper_accuracy": PAPER_ACCURACY[attention][task],
                         "steps_per_second": speed, "peak_memory_mib": memory, "memory_source": source,
                         "status": "ok"})
    return rows


def accuracy_table(rows: list[dict], tasks, attentions) -> str:
    """LRA's Table 1 layout: a row per model, a column per task, 'ours (paper)' accuracy."""
    by = {(r["task"], r["attention"]): r for r in rows if r["status"] == "ok"}
    steps = ", ".join(f"{t} {r['steps']}" for t, r in {r["task"]: r for r in rows}.items())
    lines = [f"Accuracy (%) on {rows[0]['split']}, ours (LRA paper); steps trained: {steps}", "",
             "| Model | " + " | ".join(tasks) + " | Avg |", "|---" * (len(tasks) + 2) + "|"]
    for attention in attentions:
        ours = [by[(t, attention)]["accuracy"] for t in tasks if (t, attention) in by]
        cells = [f"{by[(t, attention)]['accuracy']:.2f} ({PAPER_ACCURACY[attention][t]:.2f})" if (t, attention) in by
                 else "failed" if any(r["task"] == t and r["attention"] == attention for r in rows) else "-"
                 for t in tasks]
        paper_avg = statistics.mean(PAPER_ACCURACY[attention][t] for t in tasks)
        avg = f"{statistics.mean(ours):.2f} ({paper_avg:.2f})" if ours else "-"
        lines.append(f"| {NAMES[attention]} | " + " | ".join(cells) + f" | {avg} |")
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['task']} / {row['attention']}: {row['status']}")
    return "\n".join(lines)


def text_model_overrides(attention: str) -> list[str]:
    """Flags that give a ListOps run the Text task's model (`configs/lra_text.py`) for `attention`."""
    model = task_config("text", attention).model
    flags = [f"--config.model.{name}={getattr(model, name)}"
             for name in ("num_layers", "num_heads", "d_model", "d_ff", "classifier_dim", "dropout",
                          "attention_dropout", "position", "pooling", "global_first_token")]
    if attention == "performer":
        flags += [f"--config.model.attention.{name}={model.attention[name]}"
                  for name in ("num_features", "feature_map", "orthogonal", "random_features")]
    return flags


def efficiency(args, data_dir: pathlib.Path) -> list[dict]:
    """Trains the Text model `args.steps` steps per length and attention; returns the rows of the CSV.

    The runs are `configs/lra_listops.py:<attention>` with the Text task's
    model (`text_model_overrides`) and batch, on the generated ListOps
    examples in `data_dir` cut or padded to each length: the speed and
    memory of a step do not depend on what the tokens say.
    """
    text_batch = task_config("text", "full").phases.batch_size[0]
    rows = []
    for length in args.lengths:
        for attention in args.attentions:
            workdir = args.workdir_root / f"{length}" / attention
            overrides = [
                *text_model_overrides(attention), f"--config.phases.batch_size=({text_batch},)",
                f"--config.data.dir={data_dir}", f"--config.phases.seq_len=({length},)",
                f"--config.phases.steps=({args.steps},)", "--config.log_every_steps=1",
                "--config.eval.max_examples=32", *args.override, *args.attention_override[attention],
            ]
            failure = _train(f"configs/lra_listops.py:{attention}", workdir, overrides)
            row = {"seq_len": length, "attention": attention, "steps": args.steps, "status": failure or "ok"}
            if failure is None:
                speed, memory, source = speed_and_memory(workdir)
                row.update(steps_per_second=speed, peak_memory_mib=memory, memory_source=source)
            else:
                row.update(steps_per_second=float("nan"), peak_memory_mib=float("nan"), memory_source="")
            rows.append(row)
    full = {r["seq_len"]: r for r in rows if r["attention"] == "full"}
    for row in rows:
        base = full.get(row["seq_len"])
        row["speed_vs_full"] = row["steps_per_second"] / base["steps_per_second"] if base else float("nan")
        row["memory_vs_full"] = row["peak_memory_mib"] / base["peak_memory_mib"] if base else float("nan")
    return rows


def efficiency_table(rows: list[dict], lengths, attentions) -> str:
    """LRA's Table 2 layout: steps per second and peak memory per length, then both relative to full attention."""
    by = {(r["seq_len"], r["attention"]): r for r in rows}
    source = next((r["memory_source"] for r in rows if r["status"] == "ok"), "none measured")
    head = " | ".join([f"steps/s @{n}" for n in lengths] + [f"MiB @{n}" for n in lengths])
    lines = [f"Training steps per second and peak memory (MiB, {source}), "
             f"{rows[0]['steps']} steps per run; x: relative to full attention", "",
             f"| Model | {head} |", "|---" * (2 * len(lengths) + 1) + "|"]
    for attention in attentions:
        speed, memory = [], []
        for n in lengths:
            row = by.get((n, attention))
            if row is None or row["status"] != "ok":
                speed.append("-" if row is None else "failed")
                memory.append("-" if row is None else "failed")
            elif attention == "full" or "full" not in attentions:
                speed.append(f"{row['steps_per_second']:.2f}")
                memory.append(f"{row['peak_memory_mib']:.0f}")
            else:
                speed.append(f"{row['steps_per_second']:.2f} ({row['speed_vs_full']:.2f}x)")
                memory.append(f"{row['peak_memory_mib']:.0f} ({row['memory_vs_full']:.2f}x)")
        lines.append(f"| {NAMES[attention]} | " + " | ".join(speed) + " | " + " | ".join(memory) + " |")
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"{row['seq_len']} / {row['attention']}: {row['status']}")
    return "\n".join(lines)


def _plot_efficiency(rows, path):
    panels = [bench_common.Panel("steps_per_second", "training steps / s", "speed"),
              bench_common.Panel("peak_memory_mib", "peak memory (MiB)", "memory")]
    lines = [{"op": NAMES[r["attention"]], "seq": r["seq_len"], **r} for r in rows]
    bench_common.plot_against_seq(lines, path, panels=panels, measured="steps_per_second",
                                  title="LRA efficiency (the Text task's model)", figsize=(10, 4), legend_fontsize=8)


def _generate_listops(directory: pathlib.Path, *, max_length: int, train: int, validation: int, test: int) -> None:
    from longjax.data import lra_listops

    if all((directory / name).exists() for name in lra_listops.SPLIT_FILES.values()):
        return
    lra_listops.generate_files(directory, seed=0, train=train, validation=validation, test=test,
                               min_length=max(1, max_length // 4), max_length=max_length)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=("accuracy", "efficiency"), default="accuracy")
    parser.add_argument("--workdir-root", type=pathlib.Path, required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--attentions", default=",".join(ATTENTIONS))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each task's steps to train")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--lengths", default=None, help="efficiency: sequence lengths (default 1024,2048,3072,4096; "
                        "--smoke: 128,256)")
    parser.add_argument("--steps", type=int, default=20, help="efficiency: training steps per run")
    parser.add_argument("--override", action="append", default=[], help="a --config.x=y flag for every run")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "experiments" / "results")
    parser.add_argument("--smoke", action="store_true", help="both tables on a tiny model and generated ListOps")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.attentions = [a for a in args.attentions.split(",") if a]
    lengths = args.lengths or ("128,256" if args.smoke else "1024,2048,3072,4096")
    try:
        args.lengths = [int(n) for n in lengths.split(",") if n]
    except ValueError:
        parser.error(f"--lengths must be comma-separated positive ints, got {lengths!r}")
    if not args.lengths or min(args.lengths) < 1:
        parser.error(f"--lengths must be comma-separated positive ints, got {lengths!r}")
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step's time holds the compilation), got {args.steps}")
    for name, values, allowed in (("--tasks", args.tasks, TASKS), ("--attentions", args.attentions, ATTENTIONS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            parser.error(f"{name} must be a comma-separated subset of {','.join(allowed)}, got {','.join(values)}")
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    args.out.mkdir(parents=True, exist_ok=True)

    args.attention_override = {attention: [] for attention in ATTENTIONS}
    if args.smoke:
        # Both modes on generated ListOps of at most 256 tokens and a 1-layer model, a few steps each.
        data = args.workdir_root / "data"
        _generate_listops(data, max_length=256, train=64, validation=32, test=32)
        root = args.workdir_root
        args.attention_override = SMOKE_ATTENTION
        args.tasks, args.split = ["listops"], "validation"
        args.scale = 4 / task_config("listops", "full").phases.steps[0]
        args.workdir_root = root / "accuracy"
        args.override = [*SMOKE_MODEL, f"--config.data.dir={data}", "--config.phases.seq_len=(256,)", *args.override]
        rows = accuracy(args)
        print(accuracy_table(rows, args.tasks, args.attentions), flush=True)
        bench_common.write_csv(str(args.out / "lra_accuracy_smoke.csv"), rows)
        args.workdir_root, args.steps = root / "efficiency", 3
        args.override = SMOKE_MODEL
        # The Text model's Performer has the head's own features: the smoke model's heads are 8 wide.
        args.attention_override = {**SMOKE_ATTENTION, "performer": ["--config.model.attention.num_features=8"]}
        rows = efficiency(args, data)
        print(efficiency_table(rows, args.lengths, args.attentions), flush=True)
        bench_common.write_csv(str(args.out / "lra_efficiency_smoke.csv"), rows)
        _plot_efficiency(rows, str(args.out / "lra_efficiency_smoke.png"))
        return

    if args.mode == "accuracy":
        rows = accuracy(args)
        print(accuracy_table(rows, args.tasks, args.attentions), flush=True)
        bench_common.write_csv(str(args.out / "lra_accuracy.csv"), rows)
    else:
        data = args.workdir_root / "data"
        _generate_listops(data, max_length=2000, train=2048, validation=64, test=64)
        rows = efficiency(args, data)
        print(efficiency_table(rows, args.lengths, args.attentions), flush=True)
        bench_common.write_csv(str(args.out / "lra_efficiency.csv"), rows)
        _plot_efficiency(rows, str(args.out / "lra_efficiency.png"))


if __name__ == "__main__":
    main()
