"""Forward+backward time and planned memory of the coreference head over whole documents, against length.

    python experiments/bench_coref_head.py [--seqs 512,1024,2048,4096] [--out experiments/results]

The head alone (`longjax.models.coref.CorefHead`) at longformer-base's width
(768) with `configs/coref.py`'s sizes (spans up to 30 tokens, 40% of the
tokens kept, 50 antecedents, FFNN 1000), on random encoder states with
25-token sentences: the part of the coreference model that grows with the
document beyond the encoder. It reports the median wall time of the jitted
loss and gradients (wrt the parameters and the encoder states) and the
program's peak memory as XLA plans it; prints a table, writes CSV and PNG.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from longjax.models import coref, transformer_config

import bench_common
from bench_common import Column, Panel

D_MODEL, SENTENCE = 768, 25


def measure(seq: int, repeats: int) -> dict:
    encoder = transformer_config(dict(vocab_size=8, num_layers=1, num_heads=12, d_model=D_MODEL, d_ff=8,
                                      attention=dict(type="full")))
    config = coref.CorefHeadConfig(dropout=0.0)
    head = coref.CorefHead(encoder, config)
    rng = np.random.default_rng(0)
    inputs = dict(padding_mask=jnp.ones((1, seq), bool),
                  sentence_map=jnp.asarray(np.arange(seq)[None] // SENTENCE, jnp.int32),
                  speaker_ids=jnp.ones((1, seq), jnp.int32), genre=jnp.zeros((1,), jnp.int32))
    hidden = jnp.asarray(rng.normal(size=(1, seq, D_MODEL)), jnp.float32)
    params = head.init(jax.random.key(0), hidden, **inputs, deterministic=True)
    # Gold: pairs of two-token mentions in consecutive sentences, one cluster each.
    starts = np.arange(0, seq - SENTENCE, 4 * SENTENCE)
    gold_starts = jnp.asarray(np.concatenate([starts, starts + SENTENCE])[None], jnp.int32)
    gold_clusters = jnp.asarray(np.tile(np.arange(1, len(starts) + 1), 2)[None], jnp.int32)

    def loss(p, h):
        out = head.apply(p, h, **inputs, deterministic=True)
        gold = coref.gold_antecedents(out, gold_starts, gold_starts + 1, gold_clusters)
        return coref.marginal_log_likelihood(out, gold).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    memory = step.lower(params, hidden).compile().memory_analysis()
    planned = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    seconds = bench_common.median_seconds(step, params, hidden, repeats=repeats)
    return {"op": "coref head", "seq": seq, "kept_spans": config.kept_spans(seq), "seconds": seconds,
            "planned_gib": planned / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="512,1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args()
    rows = [measure(int(s), args.repeats) for s in args.seqs.split(",")]
    print(bench_common.markdown_table(rows, [
        Column("seq", "seq", "d"), Column("kept spans", "kept_spans", "d"), Column("fwd+bwd (s)", "seconds", ".2f"),
        Column("planned memory (GiB)", "planned_gib", ".2f"),
    ]))
    os.makedirs(args.out, exist_ok=True)
    extra = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "d_model": D_MODEL}
    bench_common.write_csv(os.path.join(args.out, "bench_coref_head.csv"), rows, extra)
    bench_common.plot_against_seq(
        rows, os.path.join(args.out, "bench_coref_head.png"),
        panels=[Panel("seconds", "seconds", "forward+backward"), Panel("planned_gib", "GiB", "planned peak memory")],
        measured="seconds", title=f"coreference head, d_model {D_MODEL}, {jax.default_backend()}",
        figsize=(10, 4), legend_fontsize=8,
    )


if __name__ == "__main__":
    main()
