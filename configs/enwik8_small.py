"""Longformer character LM, small model, on enwik8: the paper's five-phase recipe (see longjax/recipes.py)."""

from longjax import recipes


def get_config():
    return recipes.char_lm_config("enwik8", "small")
