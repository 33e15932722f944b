"""LRA Retrieval, AAN citation pairs (Tay et al. 2021, Table 1): `--config=configs/lra_retrieval.py:<attention>`.

    python -m longjax.train --config=configs/lra_retrieval.py:sliding_window --workdir=RUN \
        --config.data.dir=AAN_DIR    # new_aan_pairs.{train,eval,test}.tsv

`<attention>`: full | sliding_window | block_sparse | performer (default
sliding_window). LRA's matching base config: 4 layers, 4 heads, 128 wide, MLP
512, CLS pooling, 4,000 bytes per document, batch 32, 5,000 steps, weight decay
0.1, `0.05 * linear_warmup * rsqrt_decay` with warmup 8,000 (longer than the
run, so the rate only rises).
"""

from configs import _lra

SEQ_LEN = 4000
STEPS = 5000
WARMUP = 8000


def get_config(attention="sliding_window"):
    return _lra.lra_config(
        "lra_retrieval", attention, vocab_size=257, num_labels=2, seq_len=SEQ_LEN, num_layers=4, num_heads=4,
        d_model=128, d_ff=512, classifier_dim=512, pooling="cls", dropout=0.1, attention_dropout=0.1,
        batch_size=32, steps=STEPS, learning_rate=_lra.rsqrt_peak(0.05, WARMUP, STEPS), warmup_steps=WARMUP,
        decay="rsqrt", weight_decay=0.1,
    )
