"""Forward+backward time and peak memory of every attention implementation against sequence length.

    python experiments/speed_memory_figures.py            # each op's lengths double until it no longer fits
    python experiments/speed_memory_figures.py --quick    # 512 .. 32,768 tokens, under 15 minutes on 2 CPU cores
    python experiments/speed_memory_figures.py --smoke    # 128 and 256 tokens, 1 repeat: checks the script

The Longformer paper's Figure 1 and the Performer paper's Figure 3 for this machine: one
log-log line per attention implementation, time on the left, memory on the right. The ops
(`OPS`): the dense reference (`longjax.attention.dense_attention`, full attention),
`jax.nn.dot_product_attention` (implementation='xla'), `sliding_window_attention`,
`block_sparse_attention` and `favor_attention` (bidirectional and causal) with impl='xla'
and impl='pallas', and identity attention (out = v), the lower bound the Performer paper
draws. Every op sees the same shapes, those of `bench_attention.py`: batch 1, 12 heads,
head_dim 64, float32; window 256 (256 keys each side), BigBird blocks of 64 (3 window,
2 global, 3 random blocks), 256 random features.

For each op and length it compiles one program computing the output and the gradients
wrt q, k and v, and records:

* `seconds`: the median wall time over --repeats calls (`bench_common.median_seconds`);
* `peak_bytes` and where it came from (`memory_source`):
  - on a GPU or TPU each case runs in a fresh process and reads the device's
    `memory_stats()['peak_bytes_in_use']` (inputs made on the host, so nothing but the
    inputs and the program ever held device memory there): 'device_peak_bytes_in_use';
  - on the CPU `memory_stats()` is None; XLA:CPU allocates the program's buffers as its
    buffer assignment plans them, so the compiled program's `memory_analysis()`
    (arguments + outputs + temporaries) is its peak: 'xla_memory_analysis';
* `planned_bytes`: that memory analysis, on every backend; it is what the budget is checked
  against before a case runs.

Pallas kernels run on a CPU only in interpret mode, which measures nothing, so there their
rows say `skipped`. Nothing is left out silently: a row's `status` is 'ok', 'skipped: ...',
'stopped: ...' (the length where an op stopped and why) or 'failed: ...'.

Lengths start at --min-seq and double up to --max-seq. An op stops at the first length
whose plan exceeds --memory-budget-gb (default: the device's memory; on a CPU 16 GB, 8 GB
with --quick) or whose estimated time for the case (compile, warm-up and repeats, from the
length before it and the growth seen so far) exceeds --case-seconds; the dense ops stop
first. Writes speed_memory.csv and speed_memory.png under --out and prints a Markdown table
and where each op stopped.
"""

from __future__ import annotations

import os

# The parent process on a GPU must not take the device's memory: each case's own process measures it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longjax.attention import block_sparse_attention, dense_attention, favor_attention, favor_projection  # noqa: E402
from longjax.attention import sliding_window_attention  # noqa: E402

import bench_common  # noqa: E402
from bench_common import Column, Panel  # noqa: E402

# The shapes and options of bench_attention.py.
BATCH, HEADS, HEAD_DIM, WINDOW = 1, 12, 64, 256
BIGBIRD = dict(block_size=64, num_window_blocks=3, global_blocks=(0, -1), num_random_blocks=3)
PERFORMER_FEATURES = 256
DTYPE = jnp.float32

# Where a setting is not given on the command line: per mode.
PRESETS = {
    "full": dict(min_seq=512, max_seq=2**20, repeats=3, case_seconds=120.0, cpu_budget_gb=16.0),
    "quick": dict(min_seq=512, max_seq=32768, repeats=3, case_seconds=40.0, cpu_budget_gb=8.0),
    "smoke": dict(min_seq=128, max_seq=256, repeats=1, case_seconds=60.0, cpu_budget_gb=2.0),
}
# A case's time grows by at least this factor per doubling of the length (linear ops), and by at most
# this one (quadratic ops): the bounds of the factor that estimates the next length's time.
GROWTH = (2.0, 4.0)
CPU_PALLAS = "skipped: no GPU/TPU (Pallas runs on a CPU in interpret mode only, which times nothing)"


@dataclasses.dataclass(frozen=True)
class Op:
    """One line of the figure.

    Attributes:
      op: the attention pattern.
      impl: the implementation.
      build: () -> attention(q, k, v) -> out, called once per case.
    """

    op: str
    impl: str
    build: Callable[[], Callable]

    @property
    def key(self) -> str:
        return f"{self.op}/{self.impl}"


def _ops() -> tuple[Op, ...]:
    def full_mask(q, k, v):
        return dense_attention(q, k, v, jnp.ones((1, 1, 1, 1), bool))

    def sliding(impl):
        return lambda: lambda q, k, v: sliding_window_attention(q, k, v, window=WINDOW, impl=impl, **_kernel(impl))

    def bigbird(impl):
        return lambda: lambda q, k, v: block_sparse_attention(q, k, v, impl=impl, **BIGBIRD, **_kernel(impl))

    def favor(impl, causal):
        def build():
            projection = favor_projection(jax.random.key(0), PERFORMER_FEATURES, HEAD_DIM)
            return lambda q, k, v: favor_attention(
                q, k, v, projection=projection, causal=causal, impl=impl, **_kernel(impl)
            )

        return build

    return (
        Op("dense", "reference", lambda: full_mask),
        Op("jax.nn.dot_product_attention", "xla",
           lambda: lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")),
        Op(f"sliding_window w={WINDOW}", "xla", sliding("xla")),
        Op(f"sliding_window w={WINDOW}", "pallas", sliding("pallas")),
        Op("block_sparse b=64 3w+2g+3r", "xla", bigbird("xla")),
        Op("block_sparse b=64 3w+2g+3r", "pallas", bigbird("pallas")),
        Op(f"favor bidirectional m={PERFORMER_FEATURES}", "xla", favor("xla", False)),
        Op(f"favor bidirectional m={PERFORMER_FEATURES}", "pallas", favor("pallas", False)),
        Op(f"favor causal m={PERFORMER_FEATURES}", "xla", favor("xla", True)),
        Op(f"favor causal m={PERFORMER_FEATURES}", "pallas", favor("pallas", True)),
        # The Performer paper's lower bound: attention that does nothing.
        Op("identity (out = v)", "none", lambda: lambda q, k, v: v),
    )


OPS = _ops()


def _kernel(impl: str) -> dict:
    # Compiled kernels only: interpret mode is never timed (Pallas rows are skipped on a CPU).
    return dict(interpret=False) if impl == "pallas" else {}


def _row(op: Op, seq: int, status: str, *, seconds=math.nan, peak_bytes=math.nan, memory_source="",
         planned_bytes=math.nan, compile_seconds=math.nan) -> dict:
    return dict(op=op.op, impl=op.impl, seq=seq, seconds=seconds, peak_bytes=peak_bytes,
                memory_source=memory_source, planned_bytes=planned_bytes, compile_seconds=compile_seconds,
                status=status)


def measure(op: Op, seq: int, *, repeats: int, budget_bytes: float) -> dict:
    """One case in this process: compile, check the plan against the budget, time, read the peak."""
    start = time.perf_counter()
    shape = (BATCH, seq, HEADS, HEAD_DIM)
    spec = jax.ShapeDtypeStruct(shape, DTYPE)
    try:
        compiled = bench_common.forward_backward(op.build()).lower(spec, spec, spec, spec).compile()
    except Exception as e:  # noqa: BLE001 - the row says what failed; the other ops go on
        return _row(op, seq, _failed(e))
    compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    if planned > budget_bytes:
        return _row(op, seq, f"stopped: plans {planned / 1e9:.2f} GB > budget {budget_bytes / 1e9:.2f} GB",
                    planned_bytes=planned)
    # Inputs made on the host: on an accelerator nothing but them and the program touches its memory.
    rng = np.random.default_rng(seq)
    args = [jax.device_put(rng.standard_normal(shape, dtype=np.float32).astype(DTYPE)) for _ in range(4)]
    try:
        seconds = bench_common.median_seconds(compiled, *args, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at run time
        return _row(op, seq, _failed(e), planned_bytes=planned)
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "device_peak_bytes_in_use"
    else:
        peak, source = planned, "xla_memory_analysis"
    return _row(op, seq, "ok", seconds=seconds, peak_bytes=peak, memory_source=source, planned_bytes=planned,
                compile_seconds=compile_seconds)


def _failed(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return "failed: " + (text[:200] + " ..." if len(text) > 200 else text)


def measure_in_fresh_process(op: Op, seq: int, *, repeats: int, budget_bytes: float, timeout: float) -> dict:
    """`measure` in a child process of this script: the device's peak then belongs to this case alone."""
    command = [sys.executable, os.path.abspath(__file__), "--one", op.key, str(seq), "--repeats", str(repeats),
               "--memory-budget-gb", repr(budget_bytes / 1e9)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _row(op, seq, f"failed: its process ran past {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])
        return _row(op, seq, f"failed: its process exited {done.returncode}: {tail[:200]}")
    return json.loads(lines[-1])


def _estimated_next(rows: list[dict], repeats: int) -> float:
    """The estimated wall time of an op's next (doubled) length: compile, warm-up and repeats.

    The compile time is taken as the last one; a call's time as the last one times the growth
    from the length before it, bounded by GROWTH.
    """
    growth = GROWTH[0]
    if len(rows) >= 2 and rows[-2]["seconds"] > 0:
        growth = min(max(rows[-1]["seconds"] / rows[-2]["seconds"], GROWTH[0]), GROWTH[1])
    return rows[-1]["compile_seconds"] + (1 + repeats) * rows[-1]["seconds"] * growth


def run_op(op: Op, seqs: list[int], *, repeats: int, budget_bytes: float, case_seconds: float,
           fresh_process: bool) -> list[dict]:
    """An op's rows up to the first length that does not fit (that row says why), or over all of seqs."""
    rows = []
    for seq in seqs:
        measured = [r for r in rows if r["status"] == "ok"]
        if measured and (estimate := _estimated_next(measured, repeats)) > case_seconds:
            rows.append(_row(op, seq, f"stopped: estimated {estimate:.0f} s for the case > "
                                      f"--case-seconds {case_seconds:g}"))
            break
        if fresh_process:
            row = measure_in_fresh_process(op, seq, repeats=repeats, budget_bytes=budget_bytes,
                                           timeout=max(4 * case_seconds, 300.0))
        else:
            row = measure(op, seq, repeats=repeats, budget_bytes=budget_bytes)
        rows.append(row)
        print(f"{op.key:45s} seq {seq:8d}: " + (
            f"{row['seconds'] * 1e3:10.1f} ms {row['peak_bytes'] / 1e6:10.1f} MB ({row['memory_source']})"
            if row["status"] == "ok" else row["status"]), flush=True)
        if row["status"] != "ok":
            break
    return rows


def bench(ops, seqs, *, repeats, budget_bytes, case_seconds, fresh_process) -> list[dict]:
    backend = jax.default_backend()
    rows, skipped = [], []
    for op in ops:
        if op.impl == "pallas" and backend == "cpu":
            skipped.append(op)
            continue
        rows += run_op(op, seqs, repeats=repeats, budget_bytes=budget_bytes, case_seconds=case_seconds,
                       fresh_process=fresh_process)
        jax.clear_caches()
    # A skipped op has a row at every length some op reached, so the table shows it beside them.
    reached = sorted({r["seq"] for r in rows}) or seqs
    rows += [_row(op, seq, CPU_PALLAS) for op in skipped for seq in reached]
    order = {op.key: i for i, op in enumerate(ops)}
    return sorted(rows, key=lambda r: (order[f"{r['op']}/{r['impl']}"], r["seq"]))


def stopping_points(rows, last_seq: int) -> str:
    """One line per op: the longest length measured and why it went no further."""
    lines = []
    for key in dict.fromkeys(f"{r['op']}/{r['impl']}" for r in rows):
        mine = [r for r in rows if f"{r['op']}/{r['impl']}" == key]
        ok = [r["seq"] for r in mine if r["status"] == "ok"]
        longest = f"longest measured {max(ok):,}" if ok else "nothing measured"
        last = mine[-1]
        why = f"the ladder's end ({last_seq:,}) reached" if last["status"] == "ok" else f"at {last['seq']:,}: {last['status']}"
        if last["status"].startswith("skipped"):
            why = last["status"]
        lines.append(f"- {key}: {longest}; {why}")
    return "\n".join(lines)


TABLE = (
    Column("op", "op", numeric=False),
    Column("impl", "impl", numeric=False),
    Column("seq", "seq", "d"),
    Column("fwd+bwd ms", "seconds", ".2f", scale=1e3),
    Column("peak MB", "peak_bytes", ".1f", scale=1e-6),
    Column("memory source", "memory_source", numeric=False),
    Column("status", "status", numeric=False),
)


def _plot(rows, path: str) -> None:
    points = [dict(r, op=f"{r['op']} [{r['impl']}]", peak_gb=r["peak_bytes"] / 1e9) for r in rows]
    sources = sorted({r["memory_source"] for r in rows if r["memory_source"]})
    bench_common.plot_against_seq(
        points, path,
        panels=(
            Panel("seconds", ylabel="forward+backward seconds (median)", title="time"),
            Panel("peak_gb", ylabel="peak GB", title="memory (" + ", ".join(sources) + ")"),
        ),
        measured="seconds",
        title=f"attention forward+backward: batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, "
              f"{jnp.dtype(DTYPE).name}, {jax.devices()[0].device_kind}",
        figsize=(13, 5), legend_fontsize=7,
    )


def _ladder(min_seq: int, max_seq: int) -> list[int]:
    seqs = [min_seq]
    while seqs[-1] * 2 <= max_seq:
        seqs.append(seqs[-1] * 2)
    return seqs


def _describe(mode: str) -> str:
    p = PRESETS[mode]
    return (f"lengths {p['min_seq']:,} .. {p['max_seq']:,}, {p['repeats']} repeat(s), --case-seconds "
            f"{p['case_seconds']:g}, on a CPU a {p['cpu_budget_gb']:g} GB budget")


def _select(ops_flag: str) -> tuple[Op, ...]:
    if not ops_flag:
        return OPS
    wanted = ops_flag.split(",")
    chosen = tuple(op for op in OPS if any(w in op.key for w in wanted))
    if not chosen:
        raise SystemExit(f"--ops {ops_flag!r} names none of: " + ", ".join(op.key for op in OPS))
    return chosen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="under 15 minutes on 2 CPU cores: " + _describe("quick"))
    mode.add_argument("--smoke", action="store_true", help="checks the script in seconds: " + _describe("smoke"))
    parser.add_argument("--min-seq", type=int, help="the first length (default: the mode's; without one, "
                                                    + _describe("full") + ")")
    parser.add_argument("--max-seq", type=int, help="no length past it")
    parser.add_argument("--repeats", type=int, help="timed calls per case, after a warm-up call")
    parser.add_argument("--case-seconds", type=float,
                        help="an op stops where one case (compile, warm-up, repeats) is estimated to take longer")
    parser.add_argument("--memory-budget-gb", type=float,
                        help="an op stops where its program plans more (default: the device's memory; "
                             "on a CPU the mode's cpu_budget_gb)")
    parser.add_argument("--ops", default="", help="comma-separated substrings of op/impl keys (default: all)")
    parser.add_argument("--fresh-process", action=argparse.BooleanOptionalAction, default=None,
                        help="each case in its own process (default: on a GPU or TPU, where it is how the "
                             "device's peak memory is read)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--one", nargs=2, metavar=("OP", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "smoke" if args.smoke else "full"]
    setting = lambda name: preset[name] if getattr(args, name) is None else getattr(args, name)
    repeats = setting("repeats")
    stats = jax.devices()[0].memory_stats()
    if args.memory_budget_gb is not None:
        budget_bytes = args.memory_budget_gb * 1e9
    elif stats and "bytes_limit" in stats:
        budget_bytes = float(stats["bytes_limit"])
    else:
        budget_bytes = preset["cpu_budget_gb"] * 1e9

    if args.one:  # the child of measure_in_fresh_process
        (op,) = [op for op in OPS if op.key == args.one[0]]
        print(json.dumps(measure(op, int(args.one[1]), repeats=repeats, budget_bytes=budget_bytes)))
        return

    fresh_process = jax.default_backend() != "cpu" if args.fresh_process is None else args.fresh_process
    seqs = _ladder(setting("min_seq"), setting("max_seq"))
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}): lengths {seqs[0]:,} .. {seqs[-1]:,}, "
          f"{repeats} repeats, budget {budget_bytes / 1e9:.1f} GB, --case-seconds {setting('case_seconds'):g}, "
          f"{'a fresh process per case' if fresh_process else 'one process'}", flush=True)
    start = time.perf_counter()
    rows = bench(_select(args.ops), seqs, repeats=repeats, budget_bytes=budget_bytes,
                 case_seconds=setting("case_seconds"), fresh_process=fresh_process)
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = (os.path.join(args.out, "speed_memory" + ext) for ext in (".csv", ".png"))
    bench_common.write_csv(csv_path, rows, extra=dict(
        device=jax.devices()[0].device_kind, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM,
        dtype=jnp.dtype(DTYPE).name, window=WINDOW, bigbird_block=BIGBIRD["block_size"],
        performer_features=PERFORMER_FEATURES, repeats=repeats,
    ))
    _plot(rows, png_path)
    print()
    print(bench_common.markdown_table(rows, TABLE))
    print()
    print("Where each op stopped:")
    print(stopping_points(rows, seqs[-1]))
    print(f"wrote {csv_path} and {png_path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
