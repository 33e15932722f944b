"""Longformer character LM, large model (30 layers, 102M parameters), on enwik8: the paper's recipe.

The small recipe (`enwik8_small.py`) with 30 layers, dropout 0.4, the large
model's phase lengths in steps, and dilation on the last 2 heads of the top
15 layers (the paper's d = 1, 2, 3 on layers 15-19, 20-24, 25-29; ours d + 1).
"""

from configs import enwik8_small
from longjax.models import layer_schedule

NUM_LAYERS = 30


def get_config():
    config = enwik8_small.get_config()
    config.model.num_layers = NUM_LAYERS
    config.model.dropout = 0.4
    config.model.attention_per_layer.window = layer_schedule.geometric_windows(NUM_LAYERS, bottom=32, top=8192)
    config.model.attention_per_layer.dilation = layer_schedule.dilate_last_heads(
        NUM_LAYERS, enwik8_small.NUM_HEADS, heads=2,
        dilations={layer: 2 + (layer - 15) // 5 for layer in range(15, 30)},
    )
    config.phases.steps = (350_000, 25_000, 10_000, 5_000, 5_000)
    return config
