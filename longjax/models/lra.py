"""The Long Range Arena classifier: an encoder, a pooled sequence, an MLP (Tay et al. 2021, section 3).

LRA trains every model from scratch with the same recipe: token (or pixel)
embeddings plus positions, pre-LayerNorm blocks and a final LayerNorm, a
pooled representation of the sequence, and a ReLU classifier. With CLS
pooling a learned CLS vector is prepended to the sequence (position 0). The
Retrieval task encodes two documents with the same encoder, pools each one's
first token (LRA's dual encoder adds no CLS), and classifies `[u, v]` with a
three-layer MLP. Here the encoder is `LongEncoder`, so each experiment's
attention is a real sparse pattern rather than LRA's dense masks.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from longjax import sections
from longjax.models.config import PerformerAttention, TransformerConfig
from longjax.models.encoder import LongEncoder

POOLINGS = ("cls", "mean")
# Token id 0 is padding in every LRA table (`longjax.data.lra_*`).
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class LRAConfig(TransformerConfig):
    """An encoder's config plus LRA's classifier.

    Attributes:
      num_labels: classes.
      pooling: 'cls' (the vector of a learned CLS token prepended to the
        sequence: one more row of the embedding table, id `vocab_size`; with
        `pair`, each document's first token, as LRA's dual encoder) or 'mean'
        (the mean over real tokens; LRA averages over padding too, which only
        differs when a sequence is padded).
      classifier_dim: width of the classifier's hidden ReLU layer (LRA's `mlp_dim`;
        the pair head has a second one of half the width, as LRA's).
      global_first_token: the first position (the CLS token; with `pair`, each
        document's first token) attends and is attended everywhere
        (Longformer's global attention on the pooled token); sliding-window and
        block-sparse layers only, each with `max_global_tokens` >= 1.
      pair: the input holds two documents per example, `[batch, 2, seq]` (Retrieval).
    """

    num_labels: int = 2
    pooling: str = "cls"
    classifier_dim: int = 512
    global_first_token: bool = False
    pair: bool = False

    def __post_init__(self):
        super().__post_init__()
        sections.require(sections.is_int(self.num_labels) and self.num_labels >= 2, "model.num_labels",
                         self.num_labels, "an int >= 2")
        sections.one_of("model.pooling", self.pooling, POOLINGS)
        sections.positive_int("model.classifier_dim", self.classifier_dim)
        if self.pair:
            sections.require(self.classifier_dim >= 2, "model.classifier_dim", self.classifier_dim,
                             ">= 2 (the pair head's second layer is half as wide)")
        if self.global_first_token:
            for layer, attention in enumerate(self.attention):
                if isinstance(attention, PerformerAttention) or not hasattr(attention, "max_global_tokens"):
                    raise ValueError(
                        f"model.global_first_token needs sliding-window or block-sparse attention in every layer; "
                        f"layer {layer} is {type(attention).__name__}"
                    )
                if not attention.max_global_tokens:
                    raise ValueError(
                        f"model.global_first_token: model.attention[{layer}].max_global_tokens must be >= 1, got "
                        f"{attention.max_global_tokens!r}"
                    )


class LRAClassifier(nn.Module):
    """Class logits of token sequences; see the module docstring."""

    config: LRAConfig

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, step=None):
        """Logits of a batch.

        Args:
          tokens: int `[batch, seq]`, or `[batch, 2, seq]` with `config.pair`; id 0 is padding.
          deterministic: disables dropout; when False, apply needs a 'dropout' rng.
          step: the training step (Performer layers that redraw their projection).

        Returns:
          float32 `[batch, num_labels]`.
        """
        cfg = self.config
        want = 3 if cfg.pair else 2
        if tokens.ndim != want:
            raise ValueError(
                f"tokens must be {'[batch, 2, seq]' if cfg.pair else '[batch, seq]'} "
                f"(model.pair={cfg.pair}), got shape {tokens.shape}"
            )
        flat = tokens.reshape(-1, tokens.shape[-1])
        real = flat != PAD_ID
        encoder_config = cfg
        if self.adds_cls_token:
            flat = jnp.concatenate([jnp.full((flat.shape[0], 1), cfg.vocab_size, flat.dtype), flat], axis=1)
            real = jnp.concatenate([jnp.ones((flat.shape[0], 1), bool), real], axis=1)
            encoder_config = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1)
        glob = None
        if cfg.global_first_token:
            glob = jnp.zeros_like(real).at[:, 0].set(True) & real
        hidden = LongEncoder(encoder_config, name="encoder")(
            flat, padding_mask=real, global_mask=glob, deterministic=deterministic, step=step
        )
        if cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = real.astype(jnp.float32)[..., None]
            pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        dense = lambda n, name: nn.Dense(n, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name)
        if cfg.pair:
            pooled = pooled.reshape(tokens.shape[0], -1)  # [u, v]
            h = nn.relu(dense(cfg.classifier_dim, "classifier_hidden")(pooled))
            h = nn.relu(dense(cfg.classifier_dim // 2, "classifier_hidden2")(h))
        else:
            h = nn.relu(dense(cfg.classifier_dim, "classifier_hidden")(pooled))
        return dense(cfg.num_labels, "classifier_out")(h).astype(jnp.float32)

    @property
    def adds_cls_token(self) -> bool:
        """Whether the model prepends its CLS token (CLS pooling of single sequences)."""
        return self.config.pooling == "cls" and not self.config.pair
