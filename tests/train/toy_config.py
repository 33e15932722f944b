"""The config of tests/train/toy_task.py: a task from outside longjax, on the unchanged training run."""

import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()
    config.task = "tests.train.toy_task"  # a dotted name: any importable module defining TASK
    config.seed = 0
    config.init_from = config_dict.placeholder(str)
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=8, num_layers=2, num_heads=2, d_model=16, d_ff=32, position="learned", max_positions=40,
        position_offset=1, layer_norm="post", dropout=0.0,
        attention=dict(type="sliding_window", window=2, max_global_tokens=1),
    ))
    config.data = ml_collections.ConfigDict(dict(vocab=8, eval_examples=32))
    config.eval = ml_collections.ConfigDict(dict(seq_len=16, batch_size=16, every_steps=4))
    config.phases = ml_collections.ConfigDict(dict(
        seq_len=(16, 32), batch_size=(8, 8), steps=(6, 3), learning_rate=(3e-3, 1e-3), window_scale=(1, 2),
    ))
    config.optimizer = ml_collections.ConfigDict(dict(grad_clip_norm=1.0))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=3, keep=2, async_save=False))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, distributed=False))
    config.log_every_steps = 2
    config.allow_config_change = False
    return config
