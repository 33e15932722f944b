"""The Longformer paper's Table 4 on text8: window sizes across layers and dilation, trained and tabulated.

    python experiments/longformer_ablations.py                                  # the paper's runs: 4 x 150K steps
    python experiments/longformer_ablations.py --scale 0.01 --config.data.dir=DATA
    python experiments/longformer_ablations.py --variants increasing,dilation --workdir-root runs/abl
    python experiments/longformer_ablations.py --smoke                          # tiny model, embedded corpus, < 1 min

Each variant of `configs/text8_ablations.py` (decreasing, fixed, increasing,
no_dilation, dilation: see that file for the schedules and what was assumed)
is trained by `python -m longjax.train` into `--workdir-root/<variant>`;
running the same command again resumes every unfinished run from its
checkpoint, and a finished run only reports. Variants whose configs are the
same (no_dilation is increasing: the table's two 1.21 rows are one run) are
trained once, in the workdir of the first.

* `--scale` trains that fraction of the paper's 150K steps (the warmup, 10% of
  the steps capped at 10K, follows); the table's title says the steps trained.
* Arguments `--config.<field>=<value>` pass through to every training run
  (`--config.data.dir=DATA` where text8.zip is). `--config.phases.steps` is
  `--scale`'s.
* `--dev-bpc evaluate` (the default) scores the whole validation split with
  `python -m longjax.evaluate` after training, as the paper reports dev BPC
  (its result is kept in the workdir, so a rerun does not score again);
  `--dev-bpc training` takes the run's last in-training evaluation from
  metrics.jsonl instead, which covers `eval.max_chars` characters (1M of
  text8's 5M for the paper's config). The table says which and how many.
* `--smoke` runs the `,smoke` configs: the same window and dilation schedules
  on a tiny model (3 layers) trained 20 steps on the embedded pydoc topics
  corpus, with `--dev-bpc training` (the first 4,096 validation characters)
  unless told otherwise. Its numbers say the script works, nothing about the
  paper's.

Prints the table in the paper's layout (two groups, Model | Dev BPC, the paper's
number beside ours) and writes `longformer_ablations[_smoke].csv` and `.png`
(a bar chart) into `--out` (experiments/results/, not versioned).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

from configs import text8_ablations
from longjax.tracking.jsonl import read_metrics

import bench_common

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "text8_ablations.py"
SPLIT = "validation"
# What the script keeps in a workdir: the dev BPC longjax.evaluate gave, with the step and limit it was for.
DEV_BPC_FILE = "ablation_dev_bpc.json"


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of Table 4: the variant that gives it, its group and the paper's dev BPC."""

    variant: str
    group: str  # 'windows' (the top half) or 'dilation' (the bottom half)
    paper_bpc: float


# Table 4, top to bottom (150K steps of phase 1, small model, text8 dev).
TABLE4 = (
    Row("decreasing", "windows", 1.24),
    Row("fixed", "windows", 1.23),
    Row("increasing", "windows", 1.21),
    Row("no_dilation", "dilation", 1.21),
    Row("dilation", "dilation", 1.20),
)
PAPER_STEPS = 150_000


def config_arg(variant: str, smoke: bool) -> str:
    return f"{variant},smoke" if smoke else variant


def model_label(variant: str, config) -> str:
    """The row's name in the paper's words, with this config's windows (the paper's own for the full configs)."""
    windows = config.model.attention_per_layer.window
    if variant == "decreasing":
        return f"Decreasing w (from {windows[0]} to {windows[-1]})"
    if variant == "fixed":
        return f"Fixed w (= {windows[0]})"
    if variant == "increasing":
        return f"Increasing w (from {windows[0]} to {windows[-1]})"
    if variant == "no_dilation":
        return "No Dilation"
    return f"Dilation on {text8_ablations.DILATED_HEADS} heads"


def plan_runs(variants: list[str], smoke: bool) -> dict[str, str]:
    """Variant -> the variant whose run gives it: the first in `text8_ablations.VARIANTS` with the same config."""
    configs = {v: text8_ablations.get_config(config_arg(v, smoke)).to_json(sort_keys=True)
               for v in text8_ablations.VARIANTS}
    return {v: next(u for u in text8_ablations.VARIANTS if configs[u] == configs[v]) for v in variants}


def train(run: str, workdir: pathlib.Path, *, smoke: bool, steps: int, overrides: list[str]) -> None:
    """`python -m longjax.train` for one run: trains, resumes, or reports that it has finished."""
    command = [
        sys.executable, "-m", "longjax.train", f"--config={CONFIG}:{config_arg(run, smoke)}",
        f"--workdir={workdir}", f"--config.phases.steps={steps}", *overrides,
    ]
    print(f"\n=== {run}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=REPO)
    if done.returncode:
        raise SystemExit(
            f"error: the {run} run failed (exit {done.returncode}; its output is above). Once the cause is "
            f"fixed, the same command resumes it from its last checkpoint in {workdir}, if it has one."
        )


def final_evaluation(workdir: pathlib.Path, steps: int) -> dict:
    """The run's evaluation at its last step, from metrics.jsonl (`bpc`, `chars`, `step`)."""
    finals = [r for r in read_metrics(workdir) if r["kind"] == "eval" and r.get("split") == SPLIT and r["step"] == steps]
    if not finals:
        raise SystemExit(f"error: {workdir}/metrics.jsonl has no {SPLIT} evaluation at step {steps}: did the run finish?")
    return finals[-1]


def evaluate(workdir: pathlib.Path, steps: int, limit: int | None) -> dict:
    """The dev BPC of the run's final checkpoint by `python -m longjax.evaluate`, or the one kept from a previous call."""
    kept_path = workdir / DEV_BPC_FILE
    if kept_path.exists():
        kept = json.loads(kept_path.read_text())
        if kept["step"] == steps and kept["limit"] == limit:
            return kept
    command = [sys.executable, "-m", "longjax.evaluate", f"--workdir={workdir}", f"--split={SPLIT}"]
    command += [] if limit is None else [f"--limit={limit}"]
    print(f"=== {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"error: evaluating {workdir} failed (exit {done.returncode}; its output is above)")
    result = json.loads((workdir / f"eval_{SPLIT}_{steps}.json").read_text())
    kept = {"step": result["step"], "limit": limit, "bpc": result["bpc"], "chars": result["chars"]}
    kept_path.write_text(json.dumps(kept))
    return kept


def per_layer(values) -> str:
    """Per-layer values for a CSV cell: layers apart by spaces, a layer's per-head values joined by commas."""
    return " ".join(",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v) for v in values)


def table(rows: list[dict], title: list[str]) -> str:
    """The rows in the paper's layout: the window rows, a blank row, the dilation rows."""
    lines = [*title, "", "| Model | Steps | Dev BPC (paper, 150K steps) | Dev BPC (ours) |", "|---|---:|---:|---:|"]
    for i, row in enumerate(rows):
        if i and row["group"] != rows[i - 1]["group"]:
            lines.append("| | | | |")
        lines.append(f"| {row['model']} | {row['steps']:,} | {row['paper_dev_bpc']:.2f} | {row['dev_bpc']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """A bar chart: the paper's dev BPC and ours side by side per row, a gap between the groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions, x = [], 0.0
    for i, row in enumerate(rows):
        x += 1.6 if i and row["group"] != rows[i - 1]["group"] else 1.0
        positions.append(x)
    width = 0.38
    fig, ax = plt.subplots(figsize=(1.9 * len(rows) + 2.5, 4.2))
    for offset, key, label in ((-width / 2, "paper_dev_bpc", "paper (150K steps)"), (width / 2, "dev_bpc", "ours")):
        bars = ax.bar([p + offset for p in positions], [r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(positions, [r["model"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel("dev BPC (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(text8_ablations.VARIANTS),
                        help=f"comma-separated rows to produce, of {','.join(text8_ablations.VARIANTS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="the fraction of the config's steps to train")
    parser.add_argument("--workdir-root", help="one workdir per run under it (default runs/text8_ablations[_smoke])")
    parser.add_argument("--dev-bpc", choices=("evaluate", "training"),
                        help="longjax.evaluate on the whole split (the default), or the run's last in-training "
                             "evaluation, over eval.max_chars characters (the default with --smoke)")
    parser.add_argument("--eval-limit", type=int, help="with --dev-bpc evaluate: score only the first N characters")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--smoke", action="store_true", help="the tiny ',smoke' configs on the embedded corpus")
    args, overrides = parser.parse_known_args(argv)
    for arg in overrides:
        if not arg.startswith("--config."):
            parser.error(f"unrecognized argument {arg!r} (only --config.<field>=<value> overrides pass through)")
        if arg.startswith("--config.phases.steps"):
            parser.error("--config.phases.steps is set from --scale")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in text8_ablations.VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: {unknown or 'none given'}; the variants are {','.join(text8_ablations.VARIANTS)}")
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    args.variants = variants
    args.overrides = overrides
    args.dev_bpc = args.dev_bpc or ("training" if args.smoke else "evaluate")
    suffix = "_smoke" if args.smoke else ""
    args.workdir_root = pathlib.Path(args.workdir_root or REPO / "runs" / f"text8_ablations{suffix}").resolve()
    args.stem = f"longformer_ablations{suffix}"
    return args


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = plan_runs(args.variants, args.smoke)
    base_steps = text8_ablations.get_config(config_arg("increasing", args.smoke)).phases.steps[0]
    steps = max(1, round(base_steps * args.scale))
    results = {}
    for run in dict.fromkeys(runs.values()):
        workdir = args.workdir_root / run
        train(run, workdir, smoke=args.smoke, steps=steps, overrides=args.overrides)
        final = final_evaluation(workdir, steps)
        results[run] = evaluate(workdir, steps, args.eval_limit) if args.dev_bpc == "evaluate" else final

    rows = []
    for row in (r for r in TABLE4 if r.variant in runs):
        config = text8_ablations.get_config(config_arg(row.variant, args.smoke))
        result = results[runs[row.variant]]
        rows.append(dict(
            group=row.group, model=model_label(row.variant, config), variant=row.variant, run=runs[row.variant],
            windows=" ".join(map(str, config.model.attention_per_layer.window)),
            dilation=per_layer(config.model.attention_per_layer.dilation),
            steps=steps, paper_dev_bpc=row.paper_bpc, dev_bpc=result["bpc"], dev_chars=int(result["chars"]),
        ))
    if not all(math.isfinite(r["dev_bpc"]) for r in rows):
        print("warning: a dev BPC is not finite", file=sys.stderr)

    chars = sorted({r["dev_chars"] for r in rows})
    source = "longjax.evaluate" if args.dev_bpc == "evaluate" else "the run's last in-training evaluation"
    what = ("SMOKE RUN: the tiny ',smoke' model on the embedded pydoc topics corpus, not text8; "
            "its numbers check the script, not the paper" if args.smoke else "Longformer small model on text8")
    title = [
        f"Table 4 (Longformer, Beltagy et al. 2020). {what}.",
        f"Trained {steps:,} steps of phase 1 (the paper: {PAPER_STEPS:,}; --scale {args.scale:g} of the config's "
        f"{base_steps:,}).",
        f"Dev BPC: {source}, over {' / '.join(f'{c:,}' for c in chars)} {SPLIT} characters. "
        "Top: window sizes across layers. Bottom: with/without dilation. "
        "'No Dilation' is the increasing run.",
    ]
    print()
    print(table(rows, title))
    os.makedirs(args.out, exist_ok=True)
    stem = pathlib.Path(args.out) / args.stem
    bench_common.write_csv(f"{stem}.csv", rows, dict(
        smoke=args.smoke, scale=args.scale, paper_steps=PAPER_STEPS, dev_bpc_source=args.dev_bpc,
        overrides=" ".join(args.overrides),
    ))
    plot(rows, stem.with_suffix(".png"), f"Longformer Table 4{' (smoke)' if args.smoke else ''}: dev BPC "
         f"after {steps:,} steps of phase 1 (paper: {PAPER_STEPS:,})")
    print(f"\nwrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    sys.exit(main())
