"""Forward and forward+backward speed of the Pallas attention kernels against XLA and cuDNN.

    python experiments/bench_kernels.py                       # on a GPU or TPU machine
    python experiments/bench_kernels.py --ops pallas_sliding_window,dense_flash --seqs 32768
    python experiments/bench_kernels.py --smoke               # CPU, tiny sizes, kernels interpreted

Every benchmarked attention is a `Case` in `REGISTRY` (name -> builder and
useful-work count); `--ops` selects by name, and a new kernel family joins with
one `register(Case(...))`. For each case and sequence length it compiles the
forward and the forward+backward (output and the gradients wrt q, k, v)
programs and reports median wall times, useful TFLOP/s and the fraction of
dense flash attention's TFLOP/s at the same length.

Useful FLOPs count only the attended (query, key) pairs: `4 * pairs * head_dim`
per head forward (QK^T and PV), x3.5 for forward+backward. Dense flash is
`jax.nn.dot_product_attention` (implementation='cudnn' where available, else
XLA); cuDNN's sliding window (`local_window_size`) supports only causal windows,
so it is compared with the causal Pallas window.

It prints a table, then the issue's goals at seq 32K, window 256 each side,
head_dim 128 (where measured): the sliding-window kernel at >= 60% of dense
flash's TFLOP/s, the causal kernel faster than cuDNN's sliding window, and
causal FAVOR+ within 1.5x of bidirectional FAVOR+'s time.
It writes CSV and PNG into --out (experiments/results/, not versioned).

The whole default run is meant to fit a short lease on one accelerator:
`--budget-minutes` (default 8) stops starting new measurements once spent
(the rows left are written with a note saying so), and the goal length is
measured first, so the goals are judged even when the budget cuts the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.block_sparse_flash import GpuBlockSizes, TpuBlockSizes
from longjax.attention import arguments, bigbird_random_layout, block_sparse, block_sparse_attention
from longjax.attention import favor_attention, favor_projection, sliding_window_attention, specs

import bench_common
from bench_common import Column, Panel


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every case of one run shares."""

    heads: int
    head_dim: int
    window: int  # keys each side
    bigbird_block: int
    dtype: jnp.dtype
    tokens: int  # batch * seq, kept constant across lengths
    block_sizes: GpuBlockSizes | TpuBlockSizes | None
    interpret: bool | None

    def batch(self, seq: int) -> int:
        return max(1, self.tokens // seq)


class Unavailable(Exception):
    """A case that cannot run here (no cuDNN, no accelerator); the row says why."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked attention.

    Attributes:
      name: the `--ops` name.
      build: (setting, seq) -> `(q, k, v) -> out` on `[batch, seq, heads, head_dim]`;
        raises `Unavailable` where it cannot run.
      pairs: (setting, seq) -> attended (query, key) pairs per head and example.
    """

    name: str
    build: Callable[[Setting, int], Callable]
    pairs: Callable[[Setting, int], float]


REGISTRY: dict[str, Case] = {}


def register(case: Case) -> Case:
    REGISTRY[case.name] = case
    return case


# --- useful work -----------------------------------------------------------------------------


def _dense_pairs(setting, seq):
    return float(seq) * seq


def _band_pairs(left: int, right: int):
    """Pairs with -left <= key - query <= right inside [0, seq)."""

    def pairs(setting, seq):
        offsets = np.arange(-left, right + 1)
        return float(np.sum(seq - np.abs(offsets[np.abs(offsets) < seq])))

    return pairs


def _bigbird_spec(setting, seq):
    blocks = -(-seq // setting.bigbird_block)
    layout = bigbird_random_layout(blocks, setting.heads, 3, seed=0)
    return specs.BlockSparseSpec(
        block_size=setting.bigbird_block, num_blocks=blocks, window_radius=1,
        global_blocks=arguments.normalize_global_blocks((0, -1), blocks), random_layout=layout, causal=False,
    )


def _bigbird_pairs(setting, seq):
    """Window, global and random blocks of the sparse rows, plus the global rows against everything."""
    spec = _bigbird_spec(setting, seq)
    _, _, used = block_sparse.key_block_lists(spec)
    sparse = used.sum() / setting.heads * spec.block_size**2
    return float(sparse + len(spec.global_blocks) * spec.block_size * seq)


# --- the cases --------------------------------------------------------------------------------


def _pallas_options(setting):
    return dict(impl="pallas", interpret=setting.interpret, block_sizes=setting.block_sizes)


def _sliding(impl: str, causal: bool):
    def build(setting, seq):
        options = _pallas_options(setting) if impl == "pallas" else dict(impl="xla")
        window = (setting.window, 0) if causal else setting.window
        return lambda q, k, v: sliding_window_attention(q, k, v, window=window, causal=causal, **options)

    return build


def _bigbird(impl: str):
    def build(setting, seq):
        options = _pallas_options(setting) if impl == "pallas" else dict(impl="xla")
        return lambda q, k, v: block_sparse_attention(
            q, k, v, block_size=setting.bigbird_block, num_window_blocks=3, global_blocks=(0, -1),
            num_random_blocks=3, seed=0, **options,
        )

    return build


def _cudnn_works(setting, **options) -> None:
    """Raises Unavailable unless cuDNN's fused attention compiles here for these options."""
    if jax.default_backend() != "gpu":
        raise Unavailable("cuDNN attention needs a GPU")
    x = jax.ShapeDtypeStruct((1, 256, setting.heads, setting.head_dim), setting.dtype)
    try:
        jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **options)).lower(
            x, x, x
        ).compile()
    except Exception as e:  # cuDNN missing or too old for the options: report, do not fake a number
        raise Unavailable(f"cuDNN attention unavailable: {type(e).__name__}: {str(e)[:120]}") from e


def _dense_flash(setting, seq):
    try:
        _cudnn_works(setting)
        implementation = "cudnn"
    except Unavailable:
        implementation = "xla"  # the dense baseline on TPU and CPU
    attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    attention.note = f"implementation={implementation!r}"
    return attention


def _cudnn_sliding_causal(setting, seq):
    options = dict(is_causal=True, local_window_size=(setting.window, 0))
    _cudnn_works(setting, **options)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **options)


def _register_defaults():
    window_pairs = lambda setting, seq: _band_pairs(setting.window, setting.window)(setting, seq)
    causal_pairs = lambda setting, seq: _band_pairs(setting.window, 0)(setting, seq)
    register(Case("dense_flash", _dense_flash, _dense_pairs))
    register(Case("pallas_sliding_window", _sliding("pallas", causal=False), window_pairs))
    register(Case("xla_sliding_window", _sliding("xla", causal=False), window_pairs))
    register(Case("pallas_sliding_window_causal", _sliding("pallas", causal=True), causal_pairs))
    register(Case("cudnn_sliding_window_causal", _cudnn_sliding_causal, causal_pairs))
    register(Case("pallas_block_sparse", _bigbird("pallas"), _bigbird_pairs))
    register(Case("xla_block_sparse", _bigbird("xla"), _bigbird_pairs))


_register_defaults()


# --- FAVOR+ (Performer): linear attention, against dense flash and the sliding-window kernel ---
# e.g. --ops pallas_favor,pallas_favor_causal,pallas_sliding_window --seqs 4096,...,262144

FAVOR_FEATURES = 256


def _favor(impl: str, causal: bool):
    def build(setting, seq):
        options = dict(impl="pallas", interpret=setting.interpret) if impl == "pallas" else dict(impl="xla")
        projection = favor_projection(jax.random.key(0), FAVOR_FEATURES, setting.head_dim)
        return lambda q, k, v: favor_attention(q, k, v, projection=projection, causal=causal, **options)

    return build


def _favor_pairs(setting, seq):
    """FAVOR+'s own work in the table's currency (4 * pairs * head_dim FLOPs): the feature
    projections of q and k, phi(K)^T V and phi(Q) S, 8 * seq * features * head_dim."""
    return 2.0 * seq * FAVOR_FEATURES


for _causal in (False, True):
    _suffix = "_causal" if _causal else ""
    register(Case(f"pallas_favor{_suffix}", _favor("pallas", _causal), _favor_pairs))
    register(Case(f"xla_favor{_suffix}", _favor("xla", _causal), _favor_pairs))


# --- measuring and reporting (timing, CSV, table and plot helpers in bench_common.py) ---------


def blank_row(name: str, setting: Setting, seq: int, note: str = "") -> dict:
    """A row with nothing measured yet."""
    return dict(op=name, seq=seq, batch=setting.batch(seq), heads=setting.heads, head_dim=setting.head_dim,
                dtype=jnp.dtype(setting.dtype).name, fwd_ms=math.nan, fwd_bwd_ms=math.nan,
                fwd_tflops=math.nan, fwd_bwd_tflops=math.nan, note=note)


def measure(case: Case, setting: Setting, seq: int, repeats: int) -> dict:
    batch = setting.batch(seq)
    row = blank_row(case.name, setting, seq)
    try:
        attention = case.build(setting, seq)
        keys = jax.random.split(jax.random.key(seq), 4)
        shape = (batch, seq, setting.heads, setting.head_dim)
        q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32).astype(setting.dtype) for key in keys)
        fwd = bench_common.median_seconds(jax.jit(attention), q, k, v, repeats=repeats)
        fwd_bwd = bench_common.median_seconds(
            bench_common.forward_backward(attention), q, k, v, cotangent, repeats=repeats
        )
    except Unavailable as e:
        row["note"] = str(e)
        return row
    except Exception as e:  # out of memory at long lengths, typically: keep the other rows
        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return row
    flops = 4.0 * case.pairs(setting, seq) * setting.head_dim * setting.heads * batch
    row["note"] = getattr(attention, "note", "")
    row.update(fwd_ms=fwd * 1e3, fwd_bwd_ms=fwd_bwd * 1e3, fwd_tflops=flops / fwd / 1e12,
               fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e12)
    return row


def add_fractions(rows):
    """Each row's TFLOP/s as a fraction of dense flash's at the same length."""
    dense = {r["seq"]: r for r in rows if r["op"] == "dense_flash"}
    for r in rows:
        d = dense.get(r["seq"])
        for key in ("fwd", "fwd_bwd"):
            r[f"{key}_of_dense"] = r[f"{key}_tflops"] / d[f"{key}_tflops"] if d else math.nan
    return rows


TABLE = (
    Column("op", "op", numeric=False),
    Column("seq", "seq"),
    Column("batch", "batch"),
    Column("fwd ms", "fwd_ms", ".3f"),
    Column("fwd TFLOP/s", "fwd_tflops", ".3g"),
    Column("of dense", "fwd_of_dense", ".0%"),
    Column("fwd+bwd ms", "fwd_bwd_ms", ".3f"),
    Column("fwd+bwd TFLOP/s", "fwd_bwd_tflops", ".3g"),
    Column("of dense", "fwd_bwd_of_dense", ".0%"),
    Column("note", "note", numeric=False),
)


def table(rows) -> str:
    return bench_common.markdown_table(rows, TABLE)


@dataclasses.dataclass(frozen=True)
class Goal:
    """One of the issue's targets: a measured row against another at the goal length."""

    ours: str  # the op judged
    theirs: str  # the op it is judged against
    value: Callable[[dict, dict, str], float]  # (ours, theirs, 'fwd' | 'fwd_bwd') -> the figure
    met: Callable[[float], bool]
    text: Callable[[float], str]
    verdict: tuple[str, str]  # (met, missed)
    missing: str  # what the line says when either row is missing


GOALS = (
    Goal("pallas_sliding_window", "dense_flash", lambda ours, _, key: ours[f"{key}_of_dense"], lambda f: f >= 0.6,
         lambda f: f"sliding-window kernel at {f:.0%} of dense flash TFLOP/s", ("meets >= 60%", "misses >= 60%"),
         "sliding window vs dense flash"),
    Goal("pallas_sliding_window_causal", "cudnn_sliding_window_causal",
         lambda ours, theirs, key: theirs[f"{key}_ms"] / ours[f"{key}_ms"], lambda r: r > 1,
         lambda r: f"causal kernel {r:.2f}x the speed of cuDNN's sliding window", ("beats it", "does not beat it"),
         "causal window vs cuDNN's sliding window"),
    Goal("pallas_favor_causal", "pallas_favor", lambda ours, theirs, key: ours[f"{key}_ms"] / theirs[f"{key}_ms"],
         lambda r: r <= 1.5, lambda r: f"causal FAVOR+ kernel at {r:.2f}x bidirectional's time",
         ("meets <= 1.5x", "misses <= 1.5x"), "causal vs bidirectional FAVOR+"),
)


def goal(rows, seq: int) -> str:
    """The issue's targets (`GOALS`), judged on what was measured."""
    at = {r["op"]: r for r in rows if r["seq"] == seq and r["fwd_bwd_ms"] == r["fwd_bwd_ms"]}
    lines = [f"goal at seq {seq}:"]
    for target in GOALS:
        ours, theirs = at.get(target.ours), at.get(target.theirs)
        if not (ours and theirs):
            lines.append(f"  {target.missing}: not measured")
            continue
        for key in ("fwd", "fwd_bwd"):
            value = target.value(ours, theirs, key)
            lines.append(f"  {key}: {target.text(value)} ({target.verdict[0] if target.met(value) else target.verdict[1]})")
    return "\n".join(lines)


GOAL_SEQ = 32768


def measurement_order(seqs: list[int]) -> list[int]:
    """The goal length first (when asked for), then the others as given."""
    return sorted(seqs, key=lambda seq: seq != GOAL_SEQ)


def plot(rows, path: str, title: str):
    bench_common.plot_against_seq(
        rows,
        path,
        panels=(
            Panel("fwd_bwd_tflops", ylabel="useful TFLOP/s (fwd+bwd)", title="throughput", log_y=False),
            Panel("fwd_bwd_of_dense", ylabel="fraction of dense flash", title="vs dense flash attention",
                  log_y=False, hline=0.6),
        ),
        measured="fwd_bwd_ms",
        title=title,
        figsize=(12, 4.5),
        legend_fontsize=7,
    )


def _block_sizes(text: str | None):
    """'bq,bk,bq_bwd,bk_bwd' for the default backend's kernel family."""
    if not text:
        return None
    values = [int(x) for x in text.split(",")]
    family = TpuBlockSizes if jax.default_backend() == "tpu" else GpuBlockSizes
    return family(*values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="", help=f"comma-separated case names (default: all): {', '.join(REGISTRY)}")
    parser.add_argument("--seqs", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=256, help="keys each side")
    parser.add_argument("--bigbird-block", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=131072, help="batch * seq, constant across lengths")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--pallas-blocks", default=None, help="block_q,block_k,block_q_bwd,block_k_bwd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="start no new measurement after this much wall time (rows left get a note)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes with the kernels interpreted: checks the script on a CPU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.smoke:
        args.seqs, args.heads, args.head_dim, args.window = "256,512", 2, 64, 16
        args.bigbird_block, args.tokens, args.repeats = 16, 512, 1
    unknown = [op for op in filter(None, args.ops.split(",")) if op not in REGISTRY]
    if unknown:
        parser.error(f"unknown --ops {unknown}; known: {list(REGISTRY)}")
    names = [op for op in filter(None, args.ops.split(","))] or list(REGISTRY)
    if "dense_flash" not in names:
        names.insert(0, "dense_flash")  # the yardstick of every fraction
    setting = Setting(
        heads=args.heads, head_dim=args.head_dim, window=args.window, bigbird_block=args.bigbird_block,
        dtype=jnp.dtype(args.dtype), tokens=args.tokens, block_sizes=_block_sizes(args.pallas_blocks),
        interpret=True if args.smoke else None,
    )
    device = jax.devices()[0].device_kind
    print(f"device: {device}; heads {setting.heads}, head_dim {setting.head_dim}, window {setting.window} each side, "
          f"{setting.dtype.name}, batch * seq = {setting.tokens}")
    rows = []
    seqs = [int(s) for s in args.seqs.split(",")]
    deadline = time.monotonic() + 60.0 * args.budget_minutes
    for seq in measurement_order(seqs):
        for name in names:
            if time.monotonic() > deadline:
                row = blank_row(name, setting, seq, note=f"not run: --budget-minutes {args.budget_minutes:g} spent")
            else:
                row = measure(REGISTRY[name], setting, seq, args.repeats)
            rows.append(row)
            print(f"{name:30s} seq {seq:7d}: fwd {row['fwd_ms']:9.3f} ms {row['fwd_tflops']:8.3g} TFLOP/s | "
                  f"fwd+bwd {row['fwd_bwd_ms']:9.3f} ms {row['fwd_bwd_tflops']:8.3g} TFLOP/s {row['note']}", flush=True)
    rows.sort(key=lambda r: (seqs.index(r["seq"]), names.index(r["op"])))
    add_fractions(rows)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "bench_kernels.csv")
    bench_common.write_csv(csv_path, rows, extra={"device": device})
    png_path = os.path.join(args.out, "bench_kernels.png")
    plot(rows, png_path, f"attention kernels, {device}, heads {setting.heads}, head_dim {setting.head_dim}, "
                         f"{setting.dtype.name}")
    print()
    print(table(rows))
    print(goal(rows, GOAL_SEQ))
    print(f"wrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
