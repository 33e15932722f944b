"""LRA ListOps (Tay et al. 2021, Table 1): `--config=configs/lra_listops.py:<attention>`.

    python -m longjax.data.lra_listops --out=$LONGJAX_DATA_DIR/lra_listops   # once: 96K/2K/2K examples
    python -m longjax.train --config=configs/lra_listops.py:sliding_window --workdir=RUN

`<attention>`: full | sliding_window | block_sparse | performer (default
sliding_window). LRA's listops base config: 4 layers, 8 heads, 512 wide, MLP
1,024, CLS pooling, length 2,000, batch 32, 5,000 steps, Adam with weight
decay 0.1, `0.05 * linear_warmup * rsqrt_decay` with warmup 1,000, fixed
sinusoidal positions. Its Performer is softmax FAVOR with 2 random features
(LRA's listops/configs/performer_base.py), which the paper's 18.01 reflects.
"""

from configs import _lra
from longjax.data import lra_listops

SEQ_LEN = 2000
STEPS = 5000
WARMUP = 1000


def get_config(attention="sliding_window"):
    return _lra.lra_config(
        "lra_listops", attention, vocab_size=lra_listops.VOCAB_SIZE, num_labels=lra_listops.NUM_LABELS,
        seq_len=SEQ_LEN, num_layers=4, num_heads=8, d_model=512, d_ff=1024, classifier_dim=1024, pooling="cls",
        dropout=0.1, attention_dropout=0.1,
        batch_size=32, steps=STEPS, learning_rate=_lra.rsqrt_peak(0.05, WARMUP, STEPS), warmup_steps=WARMUP,
        decay="rsqrt", weight_decay=0.1, listops=True,
    )
