"""The enwik8 small LM with Performer (FAVOR+) attention instead of Longformer's windows.

Same model size, data, phases and optimizer as enwik8_small.py. Causal FAVOR+
with 256 orthogonal softmax features, redrawn every 1,000 steps (a pure
function of seed, layer and step, so resumed runs redraw identically).
"""

from longjax import recipes


def get_config():
    config = recipes.char_lm_config("enwik8", "small")
    return recipes.with_attention(
        config, dict(type="performer", num_features=256, feature_map="softmax", redraw_interval=1000)
    )
