"""LRA Text, byte-level IMDB (Tay et al. 2021, Table 1): `--config=configs/lra_text.py:<attention>`.

    python -m longjax.train --config=configs/lra_text.py:sliding_window --workdir=RUN \
        --config.data.dir=TFDS_DATA_DIR    # imdb_reviews prepared there (array_record)

`<attention>`: full | sliding_window | block_sparse | performer (default
sliding_window). LRA's text base config: 4 layers, 4 heads, 256 wide, MLP
1,024, CLS pooling, batch 32, 20,000 steps, weight decay 0.1,
`0.05 * linear_warmup * rsqrt_decay` with warmup 8,000; reviews cut at 4K
bytes as the paper's Text task (its config file says 1,000).
"""

from configs import _lra

SEQ_LEN = 4000
STEPS = 20_000
WARMUP = 8000


def get_config(attention="sliding_window"):
    config = _lra.lra_config(
        "lra_text", attention, vocab_size=257, num_labels=2, seq_len=SEQ_LEN, num_layers=4, num_heads=4,
        d_model=256, d_ff=1024, classifier_dim=1024, pooling="cls", dropout=0.1, attention_dropout=0.1,
        batch_size=32, steps=STEPS, learning_rate=_lra.rsqrt_peak(0.05, WARMUP, STEPS), warmup_steps=WARMUP,
        decay="rsqrt", weight_decay=0.1,
    )
    config.data.validation_fraction = 0.1  # IMDB has no validation split: training reviews held out (by id)
    return config
