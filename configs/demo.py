"""A tiny character LM on an embedded corpus: the whole pipeline in a few minutes on a laptop CPU.

The same model family and training job as the Longformer recipe (TXL relative
positions, per-layer sliding windows, dilation on two heads of the top layer,
AdamW with clipping, two phases that double windows and length and halve the
learning rate), trained on the Python standard library's documentation topics
(`pydoc_data.topics`, shipped with every Python), so it needs no download.
"""

from longjax import recipes


def get_config():
    return recipes.demo_config()
