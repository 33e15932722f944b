"""The Longformer character-LM recipe as ml-collections configs; `configs/*.py` pick from it.

Longformer (Beltagy et al., 2020), section 4 and appendix: Transformer-XL
relative sinusoidal positions, pre-LayerNorm blocks, GeLU, AdamW, gradient
clipping 0.25, weight decay 0.01, dropout 0.2 (small) / 0.4 (large), and five
phases that each double every layer's window and the sequence length and halve
the learning rate (the last phase's length is capped at 23,040 by memory).
"""

from __future__ import annotations

import ml_collections

SEQ_LENS = (2048, 4096, 8192, 16384, 23040)
LEARNING_RATES = (2.5e-4, 1.25e-4, 6.25e-5, 3.125e-5, 1.5625e-5)
BATCH_SIZES = (32, 32, 16, 16, 16)
WINDOW_SCALES = (1, 2, 4, 8, 16)
STEPS = {"small": (430_000, 50_000, 50_000, 35_000, 5_000), "large": (350_000, 25_000, 10_000, 5_000, 5_000)}
NUM_LAYERS = {"small": 12, "large": 30}
DROPOUT = {"small": 0.2, "large": 0.4}
# Layers whose last two heads are dilated, by the paper's dilation d (d + 1 here:
# the paper's "dilation 0" is an undilated window, our dilation 1).
PAPER_DILATION_LAYERS = {
    "small": {1: range(6, 8), 2: range(8, 10), 3: range(10, 12)},
    "large": {1: range(15, 20), 2: range(20, 25), 3: range(25, 30)},
}
NUM_HEADS = 8
DILATED_HEADS = 2


def layer_windows(num_layers: int, bottom: int = 32, top: int = 8192) -> tuple[int, ...]:
    """Phase-1 windows growing geometrically from `bottom` (layer 0) to `top` (last layer).

    The paper gives the two ends ("small windows for the lower layers,
    increasing in the higher ones"); a constant ratio per layer is our reading.
    Windows beyond a phase's length are clipped to it, so in phase 1 (length
    2048) the top layers of the small model attend their whole causal context.
    """
    ratio = (top / bottom) ** (1.0 / max(num_layers - 1, 1))
    return tuple(int(round(bottom * ratio**layer)) for layer in range(num_layers))


def layer_dilations(size: str) -> tuple:
    """Per layer: 1 (undilated) or a per-head tuple dilating the last two heads."""
    dilations = [1] * NUM_LAYERS[size]
    for paper_d, layers in PAPER_DILATION_LAYERS[size].items():
        for layer in layers:
            dilations[layer] = (1,) * (NUM_HEADS - DILATED_HEADS) + (paper_d + 1,) * DILATED_HEADS
    return tuple(dilations)


def char_lm_config(corpus: str, size: str) -> ml_collections.ConfigDict:
    """The full Longformer recipe for `corpus` ('enwik8' | 'text8') and `size` ('small' | 'large')."""
    if size not in NUM_LAYERS:
        raise ValueError(f"size must be one of {sorted(NUM_LAYERS)}, got {size!r}")
    num_layers = NUM_LAYERS[size]
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout, data windows, layouts and projections derive from it
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=27 if corpus == "text8" else 256,  # text8: [a-z ]; enwik8: bytes
            num_layers=num_layers,
            num_heads=NUM_HEADS,
            d_model=512,
            d_ff=2048,
            position="txl_relative",  # Transformer-XL relative sinusoids with learned u, v
            layer_norm="pre",
            activation="gelu",
            dropout=DROPOUT[size],
            attention_dropout=0.0,
            dtype="float32",  # 'bfloat16' on accelerators
            param_dtype="float32",
            remat=False,  # rematerialise blocks to fit longer phases
            attention=dict(type="sliding_window", impl=None),  # causal: windows look left
            attention_per_layer=dict(window=layer_windows(num_layers), dilation=layer_dilations(size)),
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            name=corpus,  # 'enwik8' | 'text8' | 'pydoc_topics'
            dir="",  # '' = $LONGJAX_DATA_DIR, else ~/.cache/longjax/data
            download=True,  # fetch the archive when missing (checksum-verified)
        )
    )
    config.phases = ml_collections.ConfigDict(
        dict(
            seq_len=SEQ_LENS,
            batch_size=BATCH_SIZES,  # global, over all devices and hosts
            steps=STEPS[size],
            learning_rate=LEARNING_RATES,  # constant within a phase after warmup
            window_scale=WINDOW_SCALES,  # phase windows = phase-1 windows * scale, clipped to seq_len
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,  # decoupled (AdamW), on matrices only
            grad_clip_norm=0.25,
            warmup_fraction=0.1,  # of each phase's steps
            max_warmup_steps=10_000,
        )
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            seq_len=32_256,  # Transformer-XL protocol: window of 32,256 ...
            step=512,  # ... advancing 512, scoring the last 512
            batch_size=1,
            every_steps=10_000,  # validation BPC during training (None: only at the end)
            max_chars=1_000_000,  # validation characters scored during training (None: all)
        )
    )
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=2_000, keep=3, async_save=True))
    config.log_every_steps = 100
    config.distributed = False  # jax.distributed.initialize() for multi-host runs
    config.allow_config_change = False  # resume even if the saved config differs
    return config


def with_attention(config: ml_collections.ConfigDict, attention: dict) -> ml_collections.ConfigDict:
    """The same LM with another attention pattern: no per-layer windows, no window scaling."""
    config = config.copy_and_resolve_references()
    config.model.attention = attention
    config.model.attention_per_layer = {}
    config.phases.window_scale = (1,) * len(config.phases.seq_len)
    return config


def demo_config() -> ml_collections.ConfigDict:
    """configs/demo.py: the recipe shrunk to minutes on 2 CPU cores, on the embedded corpus."""
    config = char_lm_config("enwik8", "small")
    config.data.name = "pydoc_topics"
    config.model.update(
        dict(num_layers=3, num_heads=4, d_model=128, d_ff=512, dropout=0.1)
    )
    config.model.attention_per_layer = dict(window=(16, 32, 64), dilation=(1, 1, (1, 1, 2, 2)))
    config.phases.update(
        dict(
            seq_len=(128, 256),
            batch_size=(16, 8),
            steps=(300, 100),
            learning_rate=(2e-3, 1e-3),
            window_scale=(1, 2),
        )
    )
    config.optimizer.max_warmup_steps = 30
    # The final evaluation scores the whole validation split (23K characters).
    config.eval.update(dict(seq_len=256, step=64, batch_size=32, every_steps=None, max_chars=None))
    config.checkpoint.every_steps = 100
    config.log_every_steps = 25
    return config
