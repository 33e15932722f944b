"""Tiny model configs shared by the model tests."""

from __future__ import annotations

from longjax import models

# One small config per attention type; `wide` variants see the whole sequence.
ATTENTION = {
    "full": dict(type="full"),
    "sliding_window": dict(type="sliding_window", window=3),
    "block_sparse": dict(type="block_sparse", block_size=4, num_window_blocks=3, num_random_blocks=1),
    "performer": dict(type="performer", num_features=16),
}
WIDE_ATTENTION = {
    "sliding_window": dict(type="sliding_window", window=64),
    "block_sparse": dict(type="block_sparse", block_size=4, num_window_blocks=33, num_random_blocks=0),
}


def tiny_config(attention, *, position="txl_relative", **overrides):
    fields = dict(
        vocab_size=32, num_layers=2, num_heads=2, d_model=16, d_ff=32,
        position=position, max_positions=64, attention=attention,
    )
    fields.update(overrides)
    return models.transformer_config(fields)
