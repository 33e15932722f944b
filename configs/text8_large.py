"""Longformer character LM, large model, on text8: the paper's five-phase recipe (see longjax/recipes.py)."""

from longjax import recipes


def get_config():
    return recipes.char_lm_config("text8", "large")
