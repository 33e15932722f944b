"""The enwik8 small LM with BigBird block-sparse attention instead of Longformer's windows.

Same model size, data, phases and optimizer as enwik8_small.py, so the three
patterns can be compared on one task. Causal BigBird: 64-token blocks, a
window of 3 blocks (the current and the previous ones count), the first block
global and 3 random earlier blocks per query block; the layout is fixed per layer.
"""

import ml_collections
from ml_collections import config_dict

from configs import enwik8_small


def get_config():
    config = enwik8_small.get_config()
    config.model.attention = ml_collections.ConfigDict()
    config.model.attention.type = "block_sparse"
    config.model.attention.block_size = 64  # tokens per block
    config.model.attention.num_window_blocks = 3  # the block itself and one each side (the right one is masked: causal)
    config.model.attention.global_blocks = (0,)  # block indices attending and attended by everything
    config.model.attention.num_random_blocks = 3  # random earlier blocks per query block
    config.model.attention.impl = config_dict.placeholder(str)  # None | 'xla' | 'pallas' | 'reference'
    config.model.attention_per_layer = ml_collections.ConfigDict()  # every layer alike
    # The BigBird op computes the position term itself: XLA, and on a GPU or TPU the Pallas kernels
    # (impl None tries them first). On this CPU (XLA) 1.5x 'none' per train step where the head
    # features cost 2.8x (bench_model.py).
    config.model.relative_positions = "auto"
    config.phases.window_scale = (1,) * len(config.phases.seq_len)  # no windows to scale
    return config
