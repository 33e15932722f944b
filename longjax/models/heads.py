"""Task heads on a LongEncoder: RoBERTa/Longformer's pooler, masked-LM, classification, QA, multiple choice, token scores.

`EncoderWithHead` holds the encoder under 'encoder', the optional pooler
under 'pooler' and the head under 'head', so a pretrained encoder moves between
heads unchanged and each head's weights map one to one onto Hugging Face's.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax.models.config import TransformerConfig
from longjax.models.encoder import LongEncoder
from longjax.models.transformer import layer_norm

HEADS = (None, "masked_lm", "classification", "question_answering", "multiple_choice", "token_scoring",
         "span_type_and_tokens")


def _dense(cfg: TransformerConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name)


class Pooler(nn.Module):
    """tanh(Dense(x[:, 0])): the first token's representation, `[batch, d_model]`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(_dense(self.config, self.config.d_model, "dense")(hidden[:, 0])).astype(jnp.float32)


class MaskedLMHead(nn.Module):
    """Dense, exact GELU, LayerNorm, then the tied input embedding (transposed) plus a bias: `[batch, seq, vocab]`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden, embedding):
        cfg = self.config
        h = jax.nn.gelu(_dense(cfg, cfg.d_model, "dense")(hidden), approximate=False)
        h = layer_norm(cfg, "layer_norm")(h)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), cfg.parameter_dtype)
        logits = jnp.einsum("bsd,vd->bsv", h.astype(cfg.compute_dtype), embedding.astype(cfg.compute_dtype))
        return logits.astype(jnp.float32) + bias.astype(jnp.float32)


class ClassificationHead(nn.Module):
    """RoBERTa's sequence classifier on the first token: dropout, Dense, tanh, dropout, Dense: `[batch, num_labels]`."""

    config: TransformerConfig
    num_labels: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        dropout = functools.partial(nn.Dropout(rate=cfg.dropout), deterministic=self.deterministic)
        h = jnp.tanh(_dense(cfg, cfg.d_model, "dense")(dropout(hidden[:, 0])))
        return _dense(cfg, self.num_labels, "out_proj")(dropout(h)).astype(jnp.float32)


class EncoderWithHead(nn.Module):
    """A LongEncoder with an optional pooler and one task head.

    Attributes:
      config: the encoder's config.
      head: None (hidden states only), 'masked_lm', 'classification',
        'question_answering' (start/end logits), 'multiple_choice' (tokens
        `[batch, choices, seq]`, one score per choice from the pooler) or
        'token_scoring' (one score per token, e.g. per WikiHop candidate marker)
        or 'span_type_and_tokens' (HotpotQA: start/end logits, `num_labels`
        answer-type logits from the first token, and one score per token).
      num_labels: classes of the classification head.
      pooler: whether the model has the pooler (multiple choice needs it).
    """

    config: TransformerConfig
    head: str | None = None
    num_labels: int = 2
    pooler: bool = False

    @nn.compact
    def __call__(
        self, tokens, *, padding_mask=None, global_mask=None, token_type_ids=None, position_ids=None,
        deterministic: bool = True,
    ):
        """Runs the encoder and the head.

        Args:
          tokens: int `[batch, seq]` (`[batch, choices, seq]` for multiple choice).
          padding_mask, global_mask, token_type_ids, position_ids: as
            LongEncoder's, shaped like `tokens`.
          deterministic: disables dropout.

        Returns:
          A dict with 'last_hidden_state' (`[..., seq, d_model]`, shaped like
          tokens plus d_model), 'pooler_output' when the model has a pooler, and
          the head's output: 'logits' (`[batch, seq, vocab]`, `[batch,
          num_labels]` or `[batch, choices]`), 'start_logits'/'end_logits'
          (`[batch, seq]`), 'token_scores' (`[batch, seq]`), or for
          'span_type_and_tokens' all of 'start_logits', 'end_logits',
          'type_logits' (`[batch, num_labels]`) and 'token_scores'.
        """
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "multiple_choice" and not self.pooler:
            raise ValueError("head='multiple_choice' scores the pooler's output; set pooler=True")
        lead = tokens.shape[:-1]
        flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
        encoder = LongEncoder(self.config, name="encoder")
        hidden = encoder(
            flat(tokens), padding_mask=flat(padding_mask), global_mask=flat(global_mask),
            token_type_ids=flat(token_type_ids), position_ids=flat(position_ids), deterministic=deterministic,
        )
        out = {"last_hidden_state": hidden.reshape(*lead, *hidden.shape[1:])}
        pooled = None
        if self.pooler:
            pooled = Pooler(self.config, name="pooler")(hidden)
            out["pooler_output"] = pooled.reshape(*lead, -1)
        if self.head == "masked_lm":
            embedding = encoder.variables["params"]["embed"]["embedding"]
            out["logits"] = MaskedLMHead(self.config, name="head")(hidden, embedding)
        elif self.head == "classification":
            out["logits"] = ClassificationHead(self.config, self.num_labels, deterministic, name="head")(hidden)
        elif self.head == "question_answering":
            logits = QuestionAnsweringHead(self.config, name="head")(hidden)
            out["start_logits"], out["end_logits"] = logits[..., 0], logits[..., 1]
        elif self.head == "multiple_choice":
            pooled = nn.Dropout(rate=self.config.dropout)(pooled, deterministic=deterministic)
            out["logits"] = MultipleChoiceHead(self.config, name="head")(pooled).reshape(lead)
        elif self.head == "token_scoring":
            out["token_scores"] = TokenScoringHead(self.config, name="head")(hidden).reshape(*lead, -1)
        elif self.head == "span_type_and_tokens":
            out.update(SpanTypeAndTokensHead(self.config, self.num_labels, deterministic, name="head")(hidden))
        return out


class QuestionAnsweringHead(nn.Module):
    """Dense(2) on every token: start and end logits, `[batch, seq, 2]`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden):
        return _dense(self.config, 2, "qa_outputs")(hidden).astype(jnp.float32)


class MultipleChoiceHead(nn.Module):
    """Dense(1) on each choice's pooled representation: `[batch * choices, 1]`."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, pooled):
        return _dense(self.config, 1, "classifier")(pooled).astype(jnp.float32)


class TokenScoringHead(nn.Module):
    """Dense(1) on every token: `[batch, seq]` scores (Longformer's WikiHop candidate scorer)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, hidden):
        return _dense(self.config, 1, "scorer")(hidden)[..., 0].astype(jnp.float32)


class SpanTypeAndTokensHead(nn.Module):
    """HotpotQA's heads on one encoder: span start/end, answer type on the first token, a score per token.

    Returns a dict: 'start_logits', 'end_logits', 'token_scores' `[batch, seq]`
    and 'type_logits' `[batch, num_labels]` (RoBERTa's classifier on `<s>`).
    """

    config: TransformerConfig
    num_labels: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, hidden):
        span = QuestionAnsweringHead(self.config, name="span")(hidden)
        return {
            "start_logits": span[..., 0], "end_logits": span[..., 1],
            "type_logits": ClassificationHead(self.config, self.num_labels, self.deterministic, name="type")(hidden),
            "token_scores": TokenScoringHead(self.config, name="tokens")(hidden),
        }
