"""Forward+backward time and memory of the attention ops against sequence length.

    python experiments/bench_attention.py [--seqs 1024,4096,16384,65536] [--out experiments/results]

For each op and sequence length it compiles one program computing the output
and the gradients wrt q, k and v, reports the median wall time over repeats
and the program's peak memory as XLA plans it (arguments + outputs + temporaries),
and skips a point whose plan exceeds --memory-budget-gb. In the same run it
measures this machine's float32 matmul throughput with one large matmul, and
reports each op's useful FLOP/s as a fraction of it:
useful FLOPs = 4 * seq * keys_per_query * head_dim * heads forward, x3.5 for
forward+backward. It prints a table and writes CSV and a log-log PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
from collections.abc import Callable

import jax
import jax.numpy as jnp

from longjax.attention import block_sparse, block_sparse_attention, dense_attention, favor_attention
from longjax.attention import favor_projection, masks, sliding_window_attention, specs

import bench_common
from bench_common import Column, Panel

HEADS, HEAD_DIM, WINDOW = 12, 64, 256
BIGBIRD = dict(block_size=64, num_window_blocks=3, global_blocks=(0, -1), num_random_blocks=3)
PERFORMER_FEATURES = 256


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    attention: Callable  # (q, k, v) -> out
    # seq -> attended keys per query, for useful FLOPs; None where the op has no such count (Performer).
    keys_per_query: Callable[[int], float] | None


def _cases() -> list[Case]:
    def reference(q, k, v):
        # Dense: seq x seq scores whatever the mask, so its cost is that of full attention.
        return dense_attention(q, k, v, masks.dilated_window_mask(q.shape[1], left=WINDOW, right=WINDOW)[None, None])

    def sliding(q, k, v):
        return sliding_window_attention(q, k, v, window=WINDOW, impl="xla")

    def bigbird(q, k, v):
        return block_sparse_attention(q, k, v, impl="xla", **BIGBIRD)

    def dense_xla(q, k, v):
        # XLA's own dense attention: the fair "dense" baseline for the Performer crossover.
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    projection = favor_projection(jax.random.key(0), PERFORMER_FEATURES, HEAD_DIM)

    def performer(causal):
        return lambda q, k, v: favor_attention(q, k, v, projection=projection, causal=causal, impl="xla")

    band = lambda seq: min(seq, 2 * WINDOW + 1)
    return [
        Case("dense reference (window mask)", reference, band),
        Case("dense jax.nn.dot_product_attention", dense_xla, lambda seq: seq),
        Case(f"sliding_window w={WINDOW}", sliding, band),
        Case("block_sparse b=64 3w+2g+3r", bigbird, _bigbird_keys_per_query),
        Case(f"favor bidirectional m={PERFORMER_FEATURES}", performer(False), None),
        Case(f"favor causal m={PERFORMER_FEATURES}", performer(True), None),
    ]


def _bigbird_keys_per_query(seq: int) -> float:
    """Attended blocks x block_size, averaged over queries (global blocks see every key)."""
    block = BIGBIRD["block_size"]
    num_blocks = -(-seq // block)
    layout = block_sparse.bigbird_random_layout(
        num_blocks, HEADS, BIGBIRD["num_random_blocks"], num_window_blocks=BIGBIRD["num_window_blocks"],
        global_blocks=BIGBIRD["global_blocks"],
    )
    spec = specs.BlockSparseSpec(
        block_size=block, num_blocks=num_blocks, window_radius=BIGBIRD["num_window_blocks"] // 2,
        global_blocks=block_sparse.arguments.normalize_global_blocks(BIGBIRD["global_blocks"], num_blocks),
        random_layout=layout, causal=False,
    )
    _, _, used = block_sparse.key_block_lists(spec)
    sparse_keys = used.sum() / HEADS * block * block  # per head: sum over sparse query rows
    global_keys = len(spec.global_blocks) * block * seq
    return (sparse_keys + global_keys) / seq


def useful_flops(case: Case, seq: int) -> float | None:
    """The useful FLOPs of the case's forward+backward at `seq`: 4 * seq * keys_per_query * head_dim *
    heads forward, x3.5 with a flash-style backward (five products, the scores recomputed; an op that
    keeps its probabilities runs x3); None where the op has no key count."""
    if case.keys_per_query is None:
        return None
    return 3.5 * 4 * seq * case.keys_per_query(seq) * HEAD_DIM * HEADS


def bench(seqs, budget_bytes: float, repeats: int, ops: str = ""):
    peak = bench_common.matmul_flops_per_second()
    print(f"float32 matmul throughput (4096^3): {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for case in _cases():
        if ops and not any(op in case.name for op in ops.split(",")):
            continue
        for seq in seqs:
            shape = jax.ShapeDtypeStruct((1, seq, HEADS, HEAD_DIM), jnp.float32)
            compiled = bench_common.forward_backward(case.attention).lower(shape, shape, shape, shape).compile()
            mem = compiled.memory_analysis()
            planned = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            row = dict(op=case.name, seq=seq, planned_peak_gb=planned / 1e9)
            if planned > budget_bytes:
                row.update(seconds=float("nan"), useful_gflops=float("nan"), fraction_of_matmul=float("nan"))
                rows.append(row)
                print(f"{case.name:34s} seq {seq:6d}: skipped, plans {planned / 1e9:.1f} GB")
                continue
            keys = jax.random.split(jax.random.key(seq), 4)
            args = [jax.random.normal(key, shape.shape, jnp.float32) for key in keys]
            seconds = bench_common.median_seconds(compiled, *args, repeats=repeats)
            useful = useful_flops(case, seq)
            if useful is None:
                row.update(seconds=seconds, useful_gflops=float("nan"), fraction_of_matmul=float("nan"))
            else:
                row.update(seconds=seconds, useful_gflops=useful / seconds / 1e9,
                           fraction_of_matmul=useful / seconds / peak)
            rows.append(row)
            print(f"{case.name:34s} seq {seq:6d}: {seconds * 1e3:9.1f} ms  {planned / 1e9:6.2f} GB  "
                  f"{row['useful_gflops']:6.1f} GFLOP/s = {row['fraction_of_matmul']:.1%} of matmul")
            del args
    return peak, rows


TABLE = (
    Column("op", "op", numeric=False),
    Column("seq", "seq"),
    Column("fwd+bwd ms", "seconds", ".1f", scale=1e3),
    Column("planned peak GB", "planned_peak_gb", ".2f"),
    Column("useful GFLOP/s", "useful_gflops", ".1f"),
    Column("of matmul", "fraction_of_matmul", ".1%"),
)


def _plot(rows, path):
    bench_common.plot_against_seq(
        rows,
        path,
        panels=(
            Panel("seconds", ylabel="forward+backward seconds", title="time"),
            Panel("planned_peak_gb", ylabel="planned peak GB", title="memory"),
        ),
        measured="seconds",
        title=f"attention fwd+bwd, heads {HEADS}, head_dim {HEAD_DIM}, float32, {jax.devices()[0].device_kind}",
        figsize=(11, 4.2),
        legend_fontsize=8,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--memory-budget-gb", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", default="", help="comma-separated substrings of op names to run (default: all)")
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    peak, rows = bench(seqs, args.memory_budget_gb * 1e9, args.repeats, args.ops)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench_attention.csv")
    bench_common.write_csv(csv_path, rows, extra={"matmul_gflops": peak / 1e9})
    png_path = os.path.join(args.out, "bench_attention.png")
    _plot(rows, png_path)
    print()
    print(f"matmul throughput: {peak / 1e9:.1f} GFLOP/s; process max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")
    print(bench_common.markdown_table(rows, TABLE))
    print(_performer_crossover(rows))
    print(f"wrote {csv_path} and {png_path}")


def _performer_crossover(rows) -> str:
    """The shortest measured seq at which each Performer variant is faster than XLA's dense attention."""
    dense = {r["seq"]: r["seconds"] for r in rows if r["op"].startswith("dense jax") and r["seconds"] == r["seconds"]}
    lines = []
    for op in dict.fromkeys(r["op"] for r in rows if r["op"].startswith("favor")):
        faster = [r["seq"] for r in rows if r["op"] == op and r["seq"] in dense and r["seconds"] < dense[r["seq"]]]
        where = f"from seq {min(faster)}" if faster else "at no seq where dense was measured"
        lines.append(f"{op} beats dense {where}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
