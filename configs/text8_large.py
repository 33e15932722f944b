"""Longformer character LM, large model, on text8: the enwik8 large recipe on the 27-character corpus."""

from configs import enwik8_large


def get_config():
    config = enwik8_large.get_config()
    config.model.vocab_size = 27  # text8's alphabet: ' ' and 'a'-'z'
    config.data.name = "text8"
    return config
