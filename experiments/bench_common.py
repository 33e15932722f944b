"""What the benchmark scripts share: timing, the forward+backward program, CSV, tables and plots.

The scripts in this folder import it as `bench_common`: run as
`python experiments/<script>.py`, a script's folder is the first entry of
`sys.path`. Nothing in longjax imports it.

* `median_seconds`: the median wall time of a jitted function, after a warm-up
  call that compiles it, each call waited for with `jax.block_until_ready`;
* `forward_backward`: the jitted program computing an attention's output and
  its gradients wrt q, k and v;
* `matmul_flops_per_second`: this machine's float32 rate on one large matmul,
  the yardstick of the FLOP rates the scripts report;
* `write_csv`: rows (dicts with the same keys) and constant columns to a CSV file;
* `Column`, `markdown_table`: rows as a Markdown table;
* `Panel`, `plot_against_seq`: one line per op against the sequence length
  (log2 x axis, log y axis by default), one panel per measured field, as a PNG.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable, *args, repeats: int) -> float:
    """The median over `repeats` calls of `fn(*args)`'s wall time, the first (compiling) call left out."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of one jitted float32 `[n, n] x [n, n]` matmul, the median of `repeats` calls."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    return 2 * n**3 / median_seconds(jax.jit(jnp.matmul), a, b, repeats=repeats)


def forward_backward(attention: Callable) -> Callable:
    """`jit` of `(q, k, v, cotangent) -> (out, (dq, dk, dv))` for `attention(q, k, v) -> out`."""

    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(cotangent)

    return jax.jit(run)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> None:
    """Writes `rows` with the first row's keys as columns, then the `extra` columns, the same in every row."""
    extra = extra or {}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys([*rows[0], *extra])))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **extra})


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a table.

    Attributes:
      header: the column's title.
      key: the row field shown.
      spec: the value's format spec, e.g. ".1f" or ".0%"; "" for `str`.
      scale: the value is multiplied by it first (1e3: seconds shown as ms).
      numeric: right-aligned (numbers) or left-aligned (text).
    """

    header: str
    key: str
    spec: str = ""
    scale: float = 1.0
    numeric: bool = True

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row[self.key]
        return format(value * self.scale if self.scale != 1.0 else value, self.spec)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The rows as a Markdown table, one line per row."""
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of `plot_against_seq`: a row field on the y axis.

    Attributes:
      key: the row field drawn.
      ylabel: the y axis label.
      title: the panel's title.
      log_y: a log y axis (else linear).
      hline: the height of a dotted reference line, if any.
    """

    key: str
    ylabel: str
    title: str
    log_y: bool = True
    hline: float | None = None


def plot_against_seq(
    rows: Sequence[Mapping[str, Any]],
    path: str,
    *,
    panels: Sequence[Panel],
    measured: str,
    title: str,
    figsize: tuple[float, float],
    legend_fontsize: float,
) -> None:
    """Writes a PNG with one line per op ("op" field) against "seq", one panel per `panels` entry.

    A row is drawn only where its `measured` field is not NaN (skipped and
    failed points are left out). The x axis is log base 2; the first panel
    holds the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    axes = axes[0]
    for op in dict.fromkeys(r["op"] for r in rows):
        points = [r for r in rows if r["op"] == op and not math.isnan(r[measured])]
        if points:
            for ax, panel in zip(axes, panels, strict=True):
                ax.plot([r["seq"] for r in points], [r[panel.key] for r in points], "o-", label=op)
    for ax, panel in zip(axes, panels, strict=True):
        ax.set(xlabel="sequence length", ylabel=panel.ylabel, title=panel.title)
        if panel.hline is not None:
            ax.axhline(panel.hline, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=legend_fontsize)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
