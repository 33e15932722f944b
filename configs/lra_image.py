"""LRA Image, grayscale CIFAR-10 (Tay et al. 2021, Table 1): `--config=configs/lra_image.py:<attention>`.

    python -m longjax.train --config=configs/lra_image.py:sliding_window --workdir=RUN \
        --config.data.dir=TFDS_DATA_DIR    # cifar10 prepared there (array_record)

`<attention>`: full | sliding_window | block_sparse | performer (default
sliding_window). LRA's cifar10 configs: batch 256, 200 epochs of 45,000
images, Adam without weight decay, rate 5e-4 with one epoch of warmup then a
cosine decay, dropout 0.3 (attention 0.2); the model differs per attention
(`MODELS`, LRA's per-model files), with learned positions
(`learn_pos_emb`). LRA computes q/k/v at 64 wide in these 128-wide models;
here they are 128 wide (longjax's heads split d_model).
"""

from configs import _lra

TRAIN_IMAGES = 45_000
BATCH = 256
EPOCHS = 200
# LRA's image/configs/cifar10/<model>_base.py: (layers, heads, emb_dim, mlp_dim, pooling).
MODELS = {
    "full": (1, 8, 128, 128, "cls"),
    "sliding_window": (4, 4, 128, 128, "mean"),
    "block_sparse": (1, 4, 128, 128, "cls"),
    "performer": (1, 8, 128, 128, "cls"),
}


def get_config(attention="sliding_window"):
    if attention not in MODELS:
        raise ValueError(f"attention must be one of {tuple(MODELS)}, got {attention!r}")
    layers, heads, width, mlp, pooling = MODELS[attention]
    epoch = TRAIN_IMAGES // BATCH
    return _lra.lra_config(
        "lra_image", attention, vocab_size=257, num_labels=10, seq_len=1024, num_layers=layers, num_heads=heads,
        d_model=width, d_ff=mlp, classifier_dim=mlp, pooling=pooling, dropout=0.3, attention_dropout=0.2,
        batch_size=BATCH, steps=EPOCHS * epoch, learning_rate=5e-4, warmup_steps=epoch, decay="cosine",
        weight_decay=0.0, position="learned", eval_batch_size=256,
    )
