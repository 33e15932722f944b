"""The enwik8 small LM with BigBird block-sparse attention instead of Longformer's windows.

Same model size, data, phases and optimizer as enwik8_small.py, so the three
patterns can be compared on one task. Causal BigBird: 64-token blocks, a
window of 3 blocks (the current and the previous ones count), the first block
global and 3 random earlier blocks per query block; the layout is fixed per layer.
"""

from longjax import recipes


def get_config():
    config = recipes.char_lm_config("enwik8", "small")
    return recipes.with_attention(
        config,
        dict(type="block_sparse", block_size=64, num_window_blocks=3, global_blocks=(0,), num_random_blocks=3),
    )
