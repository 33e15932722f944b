"""Flax (linen) models of longjax: one attention layer for every pattern, blocks, CharLM, LongEncoder and its heads."""

from longjax.models.attention import (
    MultiHeadAttention,
    copy_local_to_global,
    layer_seed,
    performer_projection,
)
from longjax.models.char_lm import CharLM
from longjax.models.config import (
    ATTENTION_TYPES,
    BlockSparseAttention,
    FullAttention,
    PerformerAttention,
    SlidingWindowAttention,
    TransformerConfig,
    attention_config,
    transformer_config,
)
from longjax.models.decoding import GenerationSettings
from longjax.models.encoder import LongEncoder
from longjax.models.encoder_decoder import EncoderDecoderConfig, LongEncoderDecoder
from longjax.models.generation import generate
from longjax.models.heads import EncoderWithHead
from longjax.models.lra import LRAClassifier, LRAConfig
from longjax.models.transformer import TransformerBlock, TransformerStack

__all__ = [
    "ATTENTION_TYPES",
    "BlockSparseAttention",
    "CharLM",
    "EncoderDecoderConfig",
    "EncoderWithHead",
    "FullAttention",
    "GenerationSettings",
    "LRAClassifier",
    "LRAConfig",
    "LongEncoder",
    "LongEncoderDecoder",
    "MultiHeadAttention",
    "PerformerAttention",
    "SlidingWindowAttention",
    "TransformerBlock",
    "TransformerConfig",
    "TransformerStack",
    "attention_config",
    "copy_local_to_global",
    "generate",
    "layer_seed",
    "performer_projection",
    "transformer_config",
]
