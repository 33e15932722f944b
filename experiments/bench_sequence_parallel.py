"""Sequence parallelism: memory per device and step time of a training step against sequence length.

    python experiments/bench_sequence_parallel.py [--devices 1,2,4,8] [--seqs 4096,...] [--out experiments/results]

The host's CPU is split into 8 simulated devices (`--xla_force_host_platform_device_count=8`,
set before JAX starts). For each device count n and sequence length it compiles one training
step (loss and gradients) of a char LM with sliding-window attention on a mesh of n devices
along `sequence` (batch 1, so no data parallelism), the model config's `sequence_axis` set when
n > 1, and records:

* the memory one device's program plans (XLA's `memory_analysis`: arguments + outputs +
  temporaries), which is what has to fit one accelerator; for the sliding window it should fall
  about as 1/n (parameters, which every device holds whole here, aside);
* the median wall time of the step. The simulated devices share this host's cores, so this is
  not a speed-up measurement: it shows what the exchange and the halo recomputation cost.

Then, from a linear fit of memory per device against length for each n, the longest sequence
whose per-device plan fits `--host-gb / n` (default 24 GB: one 24 GB machine cut into n
simulated devices; n = 1 is the whole machine). Prints a table and writes CSV and PNG.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

from longjax import models  # noqa: E402

import bench_common  # noqa: E402
from bench_common import Column, Panel  # noqa: E402

# A small Longformer char LM: what grows with length is the activations, so the model is kept small.
MODEL = dict(vocab_size=256, num_layers=4, num_heads=8, d_model=256, d_ff=1024, position="rope", remat=True)
WINDOW = 256


def _model(sequence_axis):
    attention = tuple(models.SlidingWindowAttention(window=WINDOW, impl="xla") for _ in range(MODEL["num_layers"]))
    return models.CharLM(models.TransformerConfig(attention=attention, sequence_axis=sequence_axis, **MODEL))


def _train_step(model):
    def loss_fn(params, tokens):
        logits = model.apply(params, tokens[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    return jax.value_and_grad(loss_fn)


def measure(devices: int, seq: int, repeats: int) -> dict:
    mesh = jax.make_mesh((devices,), ("sequence",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])
    model = _model("sequence" if devices > 1 else None)
    tokens_shape = (1, seq + 1)
    with jax.set_mesh(mesh):
        # Tokens come whole (they are small); the model's blocks keep the activations split along seq.
        tokens = jnp.zeros(tokens_shape, jnp.int32)
        params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])
        step = jax.jit(
            _train_step(model),
            in_shardings=(NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec())),
        )
        compiled = step.lower(params, tokens).compile()
        mem = compiled.memory_analysis()
        planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        seconds = bench_common.median_seconds(compiled, params, tokens, repeats=repeats)
    return dict(devices=devices, seq=seq, gb_per_device=planned / 1e9, seconds=seconds)


def longest(rows, devices: int, budget_gb: float) -> int:
    """The longest sequence whose per-device plan fits `budget_gb`, from a linear fit over the measured lengths."""
    points = [(r["seq"], r["gb_per_device"]) for r in rows if r["devices"] == devices]
    slope, intercept = np.polyfit(*zip(*points), 1)
    return int((budget_gb - intercept) / slope)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--seqs", default="2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host-gb", type=float, default=24.0, help="the machine's memory")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device_counts = [int(x) for x in args.devices.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    rows = []
    for devices in device_counts:
        for seq in seqs:
            if seq % devices:
                raise SystemExit(f"--seqs: {seq} is not a multiple of {devices} devices")
            row = measure(devices, seq, args.repeats)
            rows.append(row)
            print(f"{devices} device(s) seq {seq:7d}: {row['gb_per_device']:7.3f} GB per device  "
                  f"{row['seconds'] * 1e3:9.1f} ms per step", flush=True)
    base = {r["seq"]: r["gb_per_device"] for r in rows if r["devices"] == 1}
    for r in rows:
        r["memory_vs_one_device"] = r["gb_per_device"] / base[r["seq"]] if r["seq"] in base else math.nan
    print()
    print(bench_common.markdown_table(rows, [
        Column("devices", "devices", "d"), Column("seq", "seq", "d"),
        Column("GB per device (planned)", "gb_per_device", ".3f"),
        Column("x one device", "memory_vs_one_device", ".2f"),
        Column("ms per step (shared host)", "seconds", ".1f", scale=1e3),
    ]))
    print()
    fits = {}
    for devices in device_counts:
        # One machine's memory, cut into `devices` equal parts.
        fits[devices] = longest(rows, devices, args.host_gb / devices)
        print(f"{devices} device(s) of {args.host_gb / devices:.1f} GB each: longest trainable sequence "
              f"~{fits[devices]:,} tokens (linear fit of the planned memory per device)")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "sequence_parallel")
    bench_common.write_csv(stem + ".csv", rows, dict(window=WINDOW, **{f"model_{k}": v for k, v in MODEL.items()}))
    plot_rows = [dict(r, op=f"{r['devices']} device(s)") for r in rows]
    bench_common.plot_against_seq(
        plot_rows, stem + ".png", measured="seconds", figsize=(11, 4), legend_fontsize=8,
        title=f"Sliding-window char LM (window {WINDOW}), sequence split over n simulated CPU devices",
        panels=[
            Panel("gb_per_device", ylabel="planned GB per device", title="memory per device"),
            Panel("seconds", ylabel="seconds per step", title="step time (devices share the host)"),
        ],
    )
    print(f"wrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    sys.exit(main())
