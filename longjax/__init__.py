"""longjax: long-document transformers in JAX/Flax (Longformer, BigBird, Performer)."""

__version__ = "0.1.0"
