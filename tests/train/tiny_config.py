"""A seconds-long version of configs/demo.py for the end-to-end training tests."""

from configs import demo


def get_config():
    config = demo.get_config()
    config.model.update(dict(num_layers=2, num_heads=2, d_model=32, d_ff=64, dropout=0.1))
    config.model.attention_per_layer = dict(window=(4, 8), dilation=(1, (1, 2)))
    config.phases.update(
        dict(seq_len=(16, 32), batch_size=(4, 4), steps=(6, 4), learning_rate=(1e-2, 5e-3), window_scale=(1, 2))
    )
    config.optimizer.update(dict(warmup_fraction=0.5, max_warmup_steps=2))
    config.eval.update(dict(seq_len=32, step=16, batch_size=8, max_chars=256))
    config.checkpoint.every_steps = 2
    config.log_every_steps = 1
    return config
