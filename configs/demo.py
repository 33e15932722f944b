"""A tiny character LM on an embedded corpus: the whole pipeline in a few minutes on a laptop CPU.

The same model family and training run as the Longformer recipe
(`enwik8_small.py`: TXL relative positions, per-layer sliding windows,
dilation on two heads of the top layer, AdamW with clipping, two phases that
double windows and length and halve the learning rate), shrunk and trained on
the Python standard library's documentation topics (`pydoc_data.topics`,
shipped with every Python), so it needs no download.
"""

from ml_collections import config_dict

from configs import enwik8_small


def get_config():
    config = enwik8_small.get_config()
    config.data.name = "pydoc_topics"
    config.model.num_layers = 3
    config.model.num_heads = 4
    config.model.d_model = 128
    config.model.d_ff = 512
    config.model.dropout = 0.1
    config.model.attention_per_layer.window = (16, 32, 64)
    config.model.attention_per_layer.dilation = (1, 1, (1, 1, 2, 2))
    config.phases.seq_len = (128, 256)
    config.phases.batch_size = (16, 8)
    config.phases.steps = (300, 100)
    config.phases.learning_rate = (2e-3, 1e-3)
    config.phases.window_scale = (1, 2)
    config.optimizer.max_warmup_steps = 30
    config.eval.seq_len = 256
    config.eval.step = 64
    config.eval.batch_size = 32
    # Only the final evaluation, over the whole validation split (23K characters).
    config.eval.every_steps = config_dict.placeholder(int)
    config.eval.max_chars = config_dict.placeholder(int)
    config.checkpoint.every_steps = 100
    config.log_every_steps = 25
    return config
