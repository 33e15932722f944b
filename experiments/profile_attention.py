"""Where an attention op's forward+backward time goes on this machine, per XLA operation.

    python experiments/profile_attention.py [--ops sliding,block_sparse] [--seq 16384] [--repeats 3]
                                            [--top 20] [--out experiments/results]

For each op (the `bench_attention.py` cases whose names contain one of
`--ops`) it compiles the same forward+backward program, runs it `--repeats`
times under `jax.profiler.trace` with XLA:CPU's per-operation trace events
(this script adds `--xla_cpu_enable_xprof_traceme=true` to XLA_FLAGS before
JAX starts; the events cost a little time themselves), and sums each
operation's time per run (the compiled module's instructions; control flow,
whose spans hold its body's operations or only its own bookkeeping, left
out). An operation is a matrix product when it is a dot or a fusion
computing one (XLA:CPU sends most to its YNNPACK library, `ynn_fusion`);
its FLOPs come from the dots' shapes in the compiled HLO (dots only: the
attention ops have no convolutions or matmul custom calls). It
prints the top operations with their share of the time and, for products,
their FLOP rate against this machine's float32 matmul rate (one 4096^3
matmul), and writes CSV and a bar-chart PNG per op. Its summary (also a CSV)
gives each op's bound: its useful FLOPs (as `bench_attention.py` counts
them) over the time during which at least one of its products ran, against
the matmul rate. That is at most the fraction `bench_attention.py` would
report if nothing but the products took time and they ran as they did here
(the mean of traced runs, not the median wall time). It also gives the
products' FLOPs per useful FLOP: above 1 where products compute scores that
the op then masks (the band's edge blocks), below 1 where an op keeps its
probabilities instead of recomputing them.

The rates are per operation: with XLA's thunk executor, independent
operations may run at once on the two cores, each then showing less than
the rate it would have alone.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before JAX starts: XLA:CPU reads its flags once. (Imported, e.g. by its test, it leaves them.)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_attention  # noqa: E402
import bench_common  # noqa: E402
from bench_common import Column  # noqa: E402

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
# Control flow: its trace span holds its body's operations, or only its own bookkeeping; either
# way not an operation of its own.
_CONTROL_FLOW = ("while", "conditional", "call")


def _instruction(line: str):
    """(name, shape dims or None for a tuple, opcode, operands and attributes) of an HLO instruction line."""
    stripped = line.strip()
    if stripped.startswith("ROOT "):
        stripped = stripped[len("ROOT "):]
    if not stripped.startswith("%") or " = " not in stripped:
        return None
    name, rhs = stripped[1:].split(" = ", 1)
    if rhs.startswith("("):  # a tuple type: skip to its closing parenthesis
        depth = 0
        for end, char in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        dims, rhs = None, rhs[end + 1:].lstrip()
    else:
        kind, _, rhs = rhs.partition(" ")
        array = re.match(r"\w+\[([\d,]*)\]", kind)
        dims = [int(d) for d in array.group(1).split(",") if d] if array else None
    opcode = re.match(r"([\w-]+)\(", rhs)
    return (name, dims, opcode.group(1), rhs[opcode.end():]) if opcode else None


def _hlo_operations(hlo: str) -> tuple[dict[str, str], dict[str, float]]:
    """({instruction: opcode}, {instruction: FLOPs of one execution}) of a compiled HLO module, the
    latter for each instruction that is, or calls a computation holding, a dot.

    A dot's FLOPs are 2 x its output elements x the product of its left operand's contracting
    dimensions; a fusion's or call's are those of the dots its computation (and the ones it calls) holds.
    """
    shapes, opcodes, calls, own = {}, {}, collections.defaultdict(list), collections.Counter()
    instruction_flops, current = {}, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            continue
        parsed = _instruction(line)
        if parsed is None:
            continue
        name, dims, opcode, rest = parsed
        shapes[name], opcodes[name] = dims, opcode
        for called in re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", rest):
            calls[name].append(called)
            calls[current].append(called)
        if opcode == "dot":
            lhs = re.search(r"%([\w.\-]+)", rest).group(1)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
            depth = math.prod(shapes[lhs][int(i)] for i in contracting.split(",") if i)
            instruction_flops[name] = 2.0 * math.prod(dims) * depth
            own[current] += instruction_flops[name]

    @functools.cache
    def computation_flops(computation: str) -> float:
        return own.get(computation, 0.0) + sum(computation_flops(c) for c in calls.get(computation, ()))

    products = dict(instruction_flops)
    for name, called in list(calls.items()):
        if name in opcodes and opcodes[name] not in _CONTROL_FLOW:
            flops = sum(computation_flops(c) for c in called)
            if flops:
                products[name] = flops
    return opcodes, products


def _busy_seconds(intervals) -> float:
    """The length of the union of `(start, end)` intervals: the time at least one of them ran."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


class Trace(NamedTuple):
    """What the profiler's trace shows of a compiled module's operations, per run."""

    seconds: dict[str, float]  # operation -> its time
    calls: dict[str, int]  # operation -> how often it ran
    product_busy: float  # seconds during which at least one matrix product ran


def _trace_times(compiled, args, repeats: int, opcodes, products) -> Trace:
    """The trace of `repeats` runs of `compiled`: each operation of the module (`opcodes`, its
    instructions) that the trace shows, control flow left out; and the time during which at least
    one of `products` ran (less than their sum where they ran at once)."""
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(repeats):
                jax.block_until_ready(compiled(*args))
        (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    seconds, calls, product_spans = collections.Counter(), collections.Counter(), []
    for event in events:
        name = event.get("name", "")
        # Complete events of the module's operations; host spans (Python, dispatch, the executor) are not.
        if event.get("ph") == "X" and opcodes.get(name, "while") not in _CONTROL_FLOW:
            seconds[name] += event["dur"] * 1e-6 / repeats
            calls[name] += 1
            if name in products:
                product_spans.append((event["ts"] * 1e-6, (event["ts"] + event["dur"]) * 1e-6))
    calls = {name: count // repeats for name, count in calls.items()}
    return Trace(dict(seconds), calls, _busy_seconds(product_spans) / repeats)


def profile(case, seq: int, repeats: int, peak: float) -> tuple[list[dict], float]:
    """One row per operation of the case's forward+backward at `seq`, slowest first; and the seconds per
    run during which at least one matrix product ran (`Trace.product_busy`)."""
    shape = jax.ShapeDtypeStruct((1, seq, bench_attention.HEADS, bench_attention.HEAD_DIM), jnp.float32)
    compiled = bench_common.forward_backward(case.attention).lower(shape, shape, shape, shape).compile()
    opcodes, products = _hlo_operations(compiled.as_text())
    keys = jax.random.split(jax.random.key(seq), 4)
    args = [jax.random.normal(key, shape.shape, jnp.float32) for key in keys]
    seconds, calls, product_busy = _trace_times(compiled, args, repeats, opcodes, products)
    total = sum(seconds.values())
    rows = []
    for name, time in sorted(seconds.items(), key=lambda item: -item[1]):
        flops = products.get(name, 0.0) * calls[name]
        rows.append(dict(
            op=case.name, seq=seq, operation=name, kind="product" if name in products else "other",
            calls=calls[name], ms=time * 1e3, share=time / total, gflop=flops / 1e9, **_rates(flops, time, peak),
        ))
    return rows, product_busy


def _rates(flops: float, seconds: float, peak: float) -> dict:
    """GFLOP/s and the fraction of the matmul rate of `flops` in `seconds` (NaN without FLOPs)."""
    if not flops:
        return dict(gflops=float("nan"), of_matmul=float("nan"))
    return dict(gflops=flops / seconds / 1e9, of_matmul=flops / seconds / peak)


def summary(rows: list[dict], product_busy: float, peak: float, useful_flops: float | None) -> dict:
    """The products' and the other operations' time per run, the products' FLOP rate, and what bounds
    the op's useful rate (`bench_attention.useful_flops`, None where the op has no such count).

    `product_busy_ms` is the time at least one product ran (`Trace.product_busy`), less than the
    products' summed time where two ran at once on the two cores. `computed_per_useful` is the
    products' FLOPs over the useful ones (above 1 where a product computes scores the op then masks,
    below 1 where an op keeps its probabilities); `bound_of_matmul` is the useful FLOPs over
    `product_busy_ms`, against the matmul rate: at most the fraction `bench_attention.py` would report
    if every other operation took no time and the products ran as they did here. NaN without a
    traced product.
    """
    product_rows = [r for r in rows if r["kind"] == "product"]
    product_ms = sum(r["ms"] for r in product_rows)
    product_flops = sum(r["gflop"] for r in product_rows) * 1e9
    total = sum(r["ms"] for r in rows)
    rates = _rates(product_flops, product_ms * 1e-3, peak)
    bound = dict(computed_per_useful=float("nan"), bound_of_matmul=float("nan"))
    if useful_flops and product_busy > 0:
        bound = dict(computed_per_useful=product_flops / useful_flops,
                     bound_of_matmul=_rates(useful_flops, product_busy, peak)["of_matmul"])
    return dict(
        op=rows[0]["op"], seq=rows[0]["seq"], total_ms=total, product_ms=product_ms, other_ms=total - product_ms,
        product_busy_ms=product_busy * 1e3,
        product_share=product_ms / total, product_gflops=rates["gflops"], product_of_matmul=rates["of_matmul"],
        **bound,
    )


TABLE = (
    Column("operation", "operation", numeric=False),
    Column("kind", "kind", numeric=False),
    Column("calls", "calls"),
    Column("ms / run", "ms", ".1f"),
    Column("share", "share", ".1%"),
    Column("GFLOP/s", "gflops", ".1f"),
    Column("of matmul", "of_matmul", ".0%"),
)
SUMMARY = (
    Column("op", "op", numeric=False),
    Column("seq", "seq"),
    Column("traced ms / run", "total_ms", ".0f"),
    Column("products ms", "product_ms", ".0f"),
    Column("other ms", "other_ms", ".0f"),
    Column("a product running, ms", "product_busy_ms", ".0f"),
    Column("products' share", "product_share", ".0%"),
    Column("products GFLOP/s", "product_gflops", ".1f"),
    Column("of matmul", "product_of_matmul", ".0%"),
    Column("computed / useful FLOPs", "computed_per_useful", ".2f"),
    Column("bound: useful FLOPs in that time, of matmul", "bound_of_matmul", ".1%"),
)


def _plot(rows, top: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:top]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1.2))
    colours = ["tab:blue" if r["kind"] == "product" else "tab:orange" for r in shown]
    ax.barh([r["operation"] for r in shown][::-1], [r["ms"] for r in shown][::-1], color=colours[::-1])
    ax.set_xlabel("ms per forward+backward (blue: matrix products)")
    ax.set_title(f"{rows[0]['op']}, seq {rows[0]['seq']}: where the time goes", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="sliding,block_sparse", help="comma-separated substrings of op names")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="operations shown in the table and the plot")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    peak = bench_common.matmul_flops_per_second()
    print(f"float32 matmul throughput (4096^3): {peak / 1e9:.1f} GFLOP/s")
    os.makedirs(args.out, exist_ok=True)
    summaries = []
    for case in bench_attention._cases():
        if not any(op in case.name for op in args.ops.split(",")):
            continue
        rows, product_busy = profile(case, args.seq, args.repeats, peak)
        summaries.append(summary(rows, product_busy, peak, bench_attention.useful_flops(case, args.seq)))
        stem = "profile_" + re.sub(r"[^a-z0-9]+", "_", case.name.lower()).strip("_") + f"_{args.seq}"
        bench_common.write_csv(os.path.join(args.out, stem + ".csv"), rows, extra={"matmul_gflops": peak / 1e9})
        _plot(rows, args.top, os.path.join(args.out, stem + ".png"))
        print(f"\n{case.name}, seq {args.seq}:")
        print(bench_common.markdown_table(rows[: args.top], TABLE))
        print(f"wrote {os.path.join(args.out, stem)}.csv and .png")
    print()
    print(bench_common.markdown_table(summaries, SUMMARY))
    bench_common.write_csv(os.path.join(args.out, f"profile_summary_{args.seq}.csv"), summaries,
                           extra={"matmul_gflops": peak / 1e9})


if __name__ == "__main__":
    main()
