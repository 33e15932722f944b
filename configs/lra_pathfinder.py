"""LRA Pathfinder, 32 x 32 (Tay et al. 2021, Table 1): `--config=configs/lra_pathfinder.py:<attention>`.

    python -m longjax.data.lra_pathfinder --out=$LONGJAX_DATA_DIR/lra_pathfinder   # once: 200K images
    python -m longjax.train --config=configs/lra_pathfinder.py:sliding_window --workdir=RUN

`<attention>`: full | sliding_window | block_sparse | performer (default
sliding_window). LRA's pathfinder32 configs: batch 512, 200 epochs of 160,000
images, Adam without weight decay, rate 1e-3 with one epoch of warmup then a
cosine decay, mean pooling; the model differs per attention (`MODELS`, LRA's
per-model files). LRA computes q/k/v at half the embedding width; here at
the full width (longjax's heads split d_model).
"""

from configs import _lra

TRAIN_IMAGES = 160_000
BATCH = 512
EPOCHS = 200
# LRA's image/configs/pathfinder32/<model>_base.py: (layers, heads, emb_dim, mlp_dim, dropout).
MODELS = {
    "full": (4, 4, 32, 32, 0.2),
    "sliding_window": (2, 2, 32, 32, 0.1),
    "block_sparse": (4, 2, 64, 64, 0.2),
    "performer": (4, 8, 32, 32, 0.2),
}


def get_config(attention="sliding_window"):
    if attention not in MODELS:
        raise ValueError(f"attention must be one of {tuple(MODELS)}, got {attention!r}")
    layers, heads, width, mlp, dropout = MODELS[attention]
    epoch = TRAIN_IMAGES // BATCH
    return _lra.lra_config(
        "lra_pathfinder", attention, vocab_size=257, num_labels=2, seq_len=1024, num_layers=layers,
        num_heads=heads, d_model=width, d_ff=mlp, classifier_dim=mlp, pooling="mean", dropout=dropout,
        attention_dropout=0.1, batch_size=BATCH, steps=EPOCHS * epoch, learning_rate=1e-3, warmup_steps=epoch,
        decay="cosine", weight_decay=0.0, eval_batch_size=512,
    )
