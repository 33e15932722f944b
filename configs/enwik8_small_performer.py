"""The enwik8 small LM with Performer (FAVOR+) attention instead of Longformer's windows.

Same model size, data, phases and optimizer as enwik8_small.py. Causal FAVOR+
with 256 orthogonal softmax features, redrawn every 1,000 steps (a pure
function of seed, layer and step, so resumed runs redraw identically).

Positions are rotary, not Transformer-XL's: FAVOR+'s variance grows like
exp(|q|^2 + |k|^2), and the relative terms ride as d_model/2 extra key
features of norm sqrt(d_model/2) each, which makes the estimate much noisier
(about 1.7x the relative error on a 512-wide layer); rotations keep the norms.
Set --config.model.position=txl_relative for the like-for-like positions; they
reach FAVOR+ as those extra features (model.relative_positions='features'),
since a linear attention has no scores to add a position term to.
"""

import ml_collections
from ml_collections import config_dict

from configs import enwik8_small


def get_config():
    config = enwik8_small.get_config()
    config.model.position = "rope"
    config.model.relative_positions = "features"  # how txl_relative would reach FAVOR+ (no scores to add to)
    config.model.attention = ml_collections.ConfigDict()
    config.model.attention.type = "performer"
    config.model.attention.num_features = 256  # random features per head
    config.model.attention.feature_map = "softmax"  # positive random features (FAVOR+); or 'relu'
    config.model.attention.orthogonal = True  # orthogonal random features (False: i.i.d. Gaussian rows)
    config.model.attention.redraw_interval = 1000  # steps between projection redraws
    config.model.attention.chunk_size = config_dict.placeholder(int)  # causal chunk length (None: automatic)
    config.model.attention.impl = config_dict.placeholder(str)  # None | 'xla' | 'pallas' | 'reference'
    config.model.attention_per_layer = ml_collections.ConfigDict()  # every layer alike
    config.phases.window_scale = (1,) * len(config.phases.seq_len)  # no windows to scale
    return config
