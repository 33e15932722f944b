"""The enwik8 small LM with Performer (FAVOR+) attention instead of Longformer's windows.

Same model size, data, phases and optimizer as enwik8_small.py. Causal FAVOR+
with 256 orthogonal softmax features, redrawn every 1,000 steps (a pure
function of seed, layer and step, so resumed runs redraw identically).

Positions are rotary, not Transformer-XL's: FAVOR+'s variance grows like
exp(|q|^2 + |k|^2), and the relative terms ride as d_model/2 extra key
features of norm sqrt(d_model/2) each, which makes the estimate much noisier
(about 1.7x the relative error on a 512-wide layer); rotations keep the norms.
Set --config.model.position=txl_relative for the like-for-like positions.
"""

from longjax import recipes


def get_config():
    config = recipes.char_lm_config("enwik8", "small")
    config = recipes.with_attention(
        config, dict(type="performer", num_features=256, feature_map="softmax", redraw_interval=1000)
    )
    config.model.position = "rope"
    return config
