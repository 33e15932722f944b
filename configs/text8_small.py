"""Longformer character LM, small model, on text8: the enwik8 small recipe on the 27-character corpus."""

from configs import enwik8_small


def get_config():
    config = enwik8_small.get_config()
    config.model.vocab_size = 27  # text8's alphabet: ' ' and 'a'-'z'
    config.data.name = "text8"
    return config
