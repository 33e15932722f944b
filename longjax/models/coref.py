"""Coarse-to-fine span-ranking coreference (Lee et al. 2018, as Joshi et al. 2019 and the Longformer paper use it).

`CorefModel` is a LongEncoder (under 'encoder', so a pretrained Longformer
loads into it unchanged) over the whole document, and `CorefHead` (under
'head') on its hidden states `h` `[batch, seq, d_model]`:

1. Candidate spans: every (start, width) with width < `max_span_width`, its
   end a real token in the start's sentence (`sentence_map`).
2. Span embedding g = [h_start, h_end, attention-weighted sum of h over the
   span (one learned logit per token), width embedding]. Its mention score
   s_m = FFNN(g) + a learned prior of its width (Joshi et al.'s `use_prior`). For the scores of every candidate the FFNN's first layer is
   applied to the four parts separately (it is linear in the concatenation),
   and the attention sum is accumulated width by width with a running
   log-sum-exp, so no `[candidates, 3 * d_model]` table is built.
3. Pruning: the `ceil(top_span_ratio * seq)` best candidates (a static
   number), of which a document keeps its first `floor(top_span_ratio *
   tokens)`, as Joshi et al. do; kept spans sorted by (start, end). Lee et
   al.'s suppression of crossing spans is not applied (it is a sequential
   greedy pass; none of the metrics needs it).
4. Coarse antecedent scores s_m(i) + s_m(j) + g_i W_c g_j + a learned prior of
   the bucketed distance i - j, for every earlier kept span j; the
   `max_top_antecedents` best per span are kept.
5. Fine scores: FFNN([g_i, g_j, g_i * g_j, phi(i, j)]), phi the embeddings of
   same speaker, genre and the bucketed distance i - j (in kept-span ranks);
   the antecedent score is coarse + fine, against a dummy antecedent scored 0.
6. Loss (`marginal_log_likelihood`): minus the log of the summed probability of
   the span's gold antecedents (the dummy when it has none), summed over kept spans.

Where this differs from Joshi et al.'s code: higher-order refinement
(`coref_depth` > 1) is not implemented, the span embeddings are used as the
encoder gives them; dropout applies to the encoder's states and to g (theirs
to the states and the span parts); the run's AdamW weight decay reaches the
head too (their task parameters use plain Adam): set `optimizer.weight_decay`
to 0 to match that.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longjax import sections
from longjax.models.config import TransformerConfig
from longjax.models.encoder import LongEncoder

# Joshi et al.'s initialisation of every head weight (BERT's): small scores at the start, so the first
# steps neither saturate the antecedent softmax nor drown the encoder in large gradients.
_INIT = nn.initializers.normal(stddev=0.02)

# Lee et al.'s distance buckets: 0, 1, 2, 3, 4, 5-7, 8-15, 16-31, 32-63, 64+.
NUM_DISTANCE_BUCKETS = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class CorefHeadConfig:
    """`config.model.coref`: the span-ranking head's sizes.

    Attributes:
      max_span_width: longest candidate span, in tokens.
      top_span_ratio: spans kept per token after mention scoring.
      max_top_antecedents: antecedents per span kept by the coarse scores.
      ffnn_size, ffnn_depth: hidden width and layers of the mention and pair scorers.
      feature_size: width of the span-width, distance, speaker and genre embeddings.
      num_genres: genre embedding rows (OntoNotes has 7).
      dropout: dropout on the span embeddings and in the scorers.
    """

    max_span_width: int = 30
    top_span_ratio: float = 0.4
    max_top_antecedents: int = 50
    ffnn_size: int = 1000
    ffnn_depth: int = 1
    feature_size: int = 20
    num_genres: int = 7
    dropout: float = 0.3

    def __post_init__(self):
        for name in ("max_span_width", "max_top_antecedents", "ffnn_size", "ffnn_depth", "feature_size", "num_genres"):
            sections.positive_int(f"model.coref.{name}", getattr(self, name))
        sections.require(isinstance(self.top_span_ratio, (int, float)) and 0 < self.top_span_ratio <= 1,
                         "model.coref.top_span_ratio", self.top_span_ratio, "a number in (0, 1]")
        sections.require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
                         "model.coref.dropout", self.dropout, "a number in [0, 1)")

    def kept_spans(self, seq_len: int) -> int:
        """The static number of spans kept from a `seq_len`-token input."""
        return max(1, math.ceil(self.top_span_ratio * seq_len))


@dataclasses.dataclass(frozen=True)
class CorefModelConfig(TransformerConfig):
    """A TransformerConfig (the encoder) with the coreference head's `coref` section."""

    coref: CorefHeadConfig = CorefHeadConfig()


def distance_bucket(distance):
    """Lee et al.'s bucket of a non-negative int distance: itself up to 4, then log2 bins, 9 from 64 on."""
    distance = jnp.maximum(jnp.asarray(distance, jnp.int32), 0)
    # floor(log2(d)) in integers (31 - leading zeros), exact on every backend, unlike a float log2.
    log_bucket = 31 - jax.lax.clz(jnp.maximum(distance, 1)) + 3
    return jnp.clip(jnp.where(distance <= 4, distance, log_bucket), 0, NUM_DISTANCE_BUCKETS - 1)


class _PartwiseDense(nn.Module):
    """A Dense layer's kernel `[in_features, size]` and bias, applied to row blocks of its input (`project`)."""

    in_features: int
    size: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self):
        self.kernel = self.param("kernel", _INIT, (self.in_features, self.size),
                                 self.param_dtype)
        self.bias = self.param("bias", nn.initializers.zeros, (self.size,), self.param_dtype)

    def project(self, part, row: int):
        rows = part.shape[-1]
        if row + rows > self.in_features:
            raise ValueError(f"project: rows [{row}, {row + rows}) exceed the layer's {self.in_features} inputs")
        kernel = self.kernel[row:row + rows].astype(self.dtype)
        return jnp.einsum("...d,df->...f", part.astype(self.dtype), kernel).astype(jnp.float32)


class SpanScorer(nn.Module):
    """An FFNN scorer, `depth` x (Dense, ReLU, dropout) then Dense(1), whose first layer can take its input in parts.

    `__call__(x)` scores `[..., in_features]` inputs: float32 `[...]`. Because
    the first layer is linear in its input, `project(part, row)` applies the
    kernel rows `[row, row + part width)` to one part of the input and
    `score(sum of the parts' projections)` finishes the scorer: the same
    scores without concatenating the parts.
    """

    in_features: int
    size: int
    depth: int
    dropout: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    def setup(self):
        self.first = _PartwiseDense(self.in_features, self.size, self.dtype, self.param_dtype, name="hidden_0")
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_INIT,
                                         name=name)
        self.hidden = [dense(self.size, f"hidden_{k}") for k in range(1, self.depth)]
        self.out = dense(1, "out")
        self.drop = nn.Dropout(self.dropout)

    def project(self, part, row: int = 0):
        """float32 `[..., size]`: `part` `[..., width]` times the first layer's kernel rows `[row, row + width)`."""
        return self.first.project(part, row)

    def score(self, projected, *, deterministic: bool):
        h = nn.relu(projected + self.first.bias.astype(jnp.float32)).astype(self.dtype)
        h = self.drop(h, deterministic=deterministic)
        for layer in self.hidden:
            h = self.drop(nn.relu(layer(h)), deterministic=deterministic)
        return self.out(h)[..., 0].astype(jnp.float32)

    def __call__(self, x, *, deterministic: bool):
        return self.score(self.project(x), deterministic=deterministic)


def _gather(values, indices):
    """`values[b, indices[b, ...]]` for `values` `[batch, n, ...]` and int `indices` `[batch, ...]`."""
    return jax.vmap(lambda v, i: v[i])(values, indices)


class CorefHead(nn.Module):
    """The coarse-to-fine span-ranking head; see the module docstring.

    Returns from `__call__` a dict (all `[batch, ...]`):
      span_starts, span_ends: int32 `[batch, K]` kept spans (token indices), sorted by (start, end);
      span_mask: bool `[batch, K]`; mention_scores: float32 `[batch, K]`;
      antecedents: int32 `[batch, K, C]` indices into the kept spans;
      antecedent_mask: bool `[batch, K, C]` (an earlier kept span);
      antecedent_scores: float32 `[batch, K, C + 1]`, column 0 the dummy (0).
    """

    encoder: TransformerConfig
    config: CorefHeadConfig

    @nn.compact
    def __call__(self, hidden, *, padding_mask, sentence_map, speaker_ids, genre, deterministic: bool):
        cfg, enc = self.config, self.encoder
        dtype, param_dtype = enc.compute_dtype, enc.parameter_dtype
        b, length, d = hidden.shape
        width, k_spans = min(cfg.max_span_width, length), cfg.kept_spans(length)
        hidden = nn.Dropout(cfg.dropout)(hidden.astype(dtype), deterministic=deterministic)
        embed = lambda n, name: nn.Embed(n, cfg.feature_size, param_dtype=param_dtype, dtype=dtype,
                                         embedding_init=_INIT, name=name)
        width_embed = embed(cfg.max_span_width, "span_width")
        span_dim = 3 * d + cfg.feature_size
        scorer = lambda n, name: SpanScorer(n, cfg.ffnn_size, cfg.ffnn_depth, cfg.dropout, dtype, param_dtype,
                                            name=name)
        mention_scorer = scorer(span_dim, "mention")
        head_logit = nn.Dense(1, dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, name="head_attention")(hidden)[..., 0]
        head_logit = head_logit.astype(jnp.float32)
        # The mention scorer's first layer applied to each part of g = [h_start, h_end, head vector, width]:
        # the head vector's projection is the attention-weighted sum of the tokens' projections.
        start_part = mention_scorer.project(hidden, 0)  # [b, L, F]
        end_part = mention_scorer.project(hidden, d)
        head_part = mention_scorer.project(hidden, 2 * d)
        width_part = mention_scorer.project(width_embed(jnp.arange(width)), 3 * d)  # [W, F]
        # Joshi et al.'s priors: a learned score of each span width, added to the mention scores, and of each
        # antecedent distance bucket, added to the coarse scores; each from its own embedding.
        width_prior = scorer(cfg.feature_size, "width_prior")(
            embed(cfg.max_span_width, "width_prior_embedding")(jnp.arange(width)), deterministic=deterministic)
        distance_table = nn.Dropout(cfg.dropout)(embed(NUM_DISTANCE_BUCKETS, "distance_prior_embedding")(
            jnp.arange(NUM_DISTANCE_BUCKETS)), deterministic=deterministic)
        distance_prior = nn.Dense(1, dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT,
                                  name="distance_prior")(distance_table)[..., 0].astype(jnp.float32)

        positions = jnp.arange(length)
        valid_token = padding_mask & (sentence_map >= 0)
        scores = []
        running_max = jnp.full((b, length), -jnp.inf)
        running_sum = jnp.zeros((b, length))
        running_head = jnp.zeros(start_part.shape, jnp.float32)
        for w in range(width):
            end = positions + w
            inside = end < length
            end_c = jnp.minimum(end, length - 1)
            logit_w = jnp.where(inside, head_logit[:, end_c], -jnp.inf)
            new_max = jnp.maximum(running_max, logit_w)
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            scale = jnp.exp(running_max - safe_max)
            weight = jnp.exp(logit_w - safe_max)
            running_sum = running_sum * scale + weight
            running_head = running_head * scale[..., None] + weight[..., None] * head_part[:, end_c]
            running_max = new_max
            projected = (start_part + end_part[:, end_c] + running_head / jnp.maximum(running_sum, 1e-30)[..., None]
                         + width_part[w])
            score = mention_scorer.score(projected, deterministic=deterministic) + width_prior[w]
            ok = (inside[None] & valid_token & valid_token[:, end_c]
                  & (sentence_map == sentence_map[:, end_c]))
            scores.append(jnp.where(ok, score, -jnp.inf))
        candidate_scores = jnp.stack(scores, axis=-1).reshape(b, length * width)  # index = start * width + w

        # Prune: the best K candidates; a document keeps floor(ratio * its tokens) of them (at least one).
        top_scores, top_index = jax.lax.top_k(candidate_scores, k_spans)
        tokens = valid_token.sum(-1)
        keep_count = jnp.maximum(jnp.floor(cfg.top_span_ratio * tokens).astype(jnp.int32), 1)
        keep = (jnp.arange(k_spans)[None] < keep_count[:, None]) & jnp.isfinite(top_scores)
        # Sort the kept spans by (start, end), which the flat index orders; dropped ones go last.
        order_key = jnp.where(keep, top_index, length * width + jnp.arange(k_spans)[None])
        order = jnp.argsort(order_key, axis=-1)
        top_index = jnp.take_along_axis(top_index, order, -1)
        span_mask = jnp.take_along_axis(keep, order, -1)
        starts, span_width = top_index // width, top_index % width
        ends = jnp.minimum(starts + span_width, length - 1)
        mention = jnp.where(span_mask, jnp.take_along_axis(candidate_scores, top_index, -1), 0.0)

        # Span embeddings of the kept spans.
        window = starts[..., None] + jnp.arange(width)  # [b, K, W]
        in_span = window <= ends[..., None]
        window = jnp.minimum(window, length - 1)
        attention = jax.nn.softmax(jnp.where(in_span, _gather(head_logit, window), -jnp.inf), axis=-1)
        head_vector = jnp.einsum("bkw,bkwd->bkd", attention.astype(dtype), _gather(hidden, window))
        g = jnp.concatenate([_gather(hidden, starts), _gather(hidden, ends), head_vector,
                             width_embed(span_width)], axis=-1)
        g = nn.Dropout(cfg.dropout)(g, deterministic=deterministic)

        # Coarse scores over earlier kept spans, then the best C of them.
        c = min(cfg.max_top_antecedents, k_spans)
        source = nn.Dense(span_dim, dtype=dtype, param_dtype=param_dtype, kernel_init=_INIT, name="coarse")(g)
        coarse = jnp.einsum("bid,bjd->bij", source, g).astype(jnp.float32)
        rank = jnp.arange(k_spans)
        earlier = (rank[None, :, None] > rank[None, None, :]) & span_mask[:, :, None] & span_mask[:, None, :]
        coarse = coarse + mention[:, :, None] + mention[:, None, :]
        coarse = coarse + distance_prior[distance_bucket(rank[:, None] - rank[None, :])][None]
        coarse = jnp.where(earlier, coarse, -jnp.inf)
        coarse_top, antecedents = jax.lax.top_k(coarse, c)  # [b, K, C]
        antecedent_mask = jnp.isfinite(coarse_top)
        antecedents = jnp.where(antecedent_mask, antecedents, 0)

        # Fine scores of the kept pairs.
        g_j = jax.vmap(lambda gb, ab: gb[ab])(g, antecedents)  # [b, K, C, E]
        g_i = jnp.broadcast_to(g[:, :, None], g_j.shape)
        speaker = _gather(speaker_ids, starts)
        same_speaker = (speaker[:, :, None] == jax.vmap(lambda s, a: s[a])(speaker, antecedents)).astype(jnp.int32)
        distance = distance_bucket(rank[None, :, None] - antecedents)
        genre_feature = jnp.broadcast_to(embed(cfg.num_genres, "genre")(genre)[:, None, None], (*g_j.shape[:3],
                                         cfg.feature_size))
        phi = jnp.concatenate([embed(2, "same_speaker")(same_speaker), genre_feature,
                               embed(NUM_DISTANCE_BUCKETS, "distance")(distance)], axis=-1)
        pair = jnp.concatenate([g_i, g_j, g_i * g_j, phi], axis=-1)
        fine = scorer(pair.shape[-1], "antecedent")(pair, deterministic=deterministic)
        pair_scores = jnp.where(antecedent_mask, coarse_top + fine, -jnp.inf)
        antecedent_scores = jnp.concatenate([jnp.zeros((b, k_spans, 1)), pair_scores], axis=-1)
        return {
            "span_starts": starts.astype(jnp.int32), "span_ends": ends.astype(jnp.int32), "span_mask": span_mask,
            "mention_scores": mention, "antecedents": antecedents.astype(jnp.int32),
            "antecedent_mask": antecedent_mask, "antecedent_scores": antecedent_scores,
        }


class CorefModel(nn.Module):
    """The Longformer encoder (under 'encoder') and the coreference head (under 'head').

    `__call__(tokens [batch, seq], padding_mask, sentence_map, speaker_ids, genre [batch], global_mask=None)`
    returns the head's dict (see `CorefHead`).
    """

    config: CorefModelConfig

    @nn.compact
    def __call__(self, tokens, *, padding_mask, sentence_map, speaker_ids, genre, global_mask=None,
                 deterministic: bool = True):
        hidden = LongEncoder(self.config, name="encoder")(
            tokens, padding_mask=padding_mask, global_mask=global_mask, deterministic=deterministic
        )
        return CorefHead(self.config, self.config.coref, name="head")(
            hidden, padding_mask=padding_mask, sentence_map=sentence_map, speaker_ids=speaker_ids, genre=genre,
            deterministic=deterministic,
        )


def gold_antecedents(outputs, gold_starts, gold_ends, gold_clusters):
    """Which kept antecedents are gold: bool `[batch, K, C + 1]`, column 0 (the dummy) where a span has none.

    Args:
      outputs: `CorefHead`'s dict.
      gold_starts, gold_ends: int `[batch, G]` gold mention spans (-1 padding).
      gold_clusters: int `[batch, G]` their cluster ids (> 0; 0 padding).
    """
    match = ((outputs["span_starts"][:, :, None] == gold_starts[:, None, :])
             & (outputs["span_ends"][:, :, None] == gold_ends[:, None, :]) & (gold_clusters[:, None, :] > 0))
    cluster = jnp.where(match, gold_clusters[:, None, :], 0).max(-1)  # [b, K], 0 = not a gold mention
    cluster = jnp.where(outputs["span_mask"], cluster, 0)
    antecedent_cluster = jax.vmap(lambda c, a: c[a])(cluster, outputs["antecedents"])
    gold = (antecedent_cluster == cluster[:, :, None]) & (cluster[:, :, None] > 0) & outputs["antecedent_mask"]
    dummy = ~gold.any(-1, keepdims=True)
    return jnp.concatenate([dummy, gold], axis=-1)


def marginal_log_likelihood(outputs, gold):
    """Minus the log of each kept span's summed gold-antecedent probability, summed over kept spans: float32 `[batch]`."""
    scores = outputs["antecedent_scores"]
    gold_scores = jnp.where(gold, scores, -jnp.inf)
    per_span = jax.nn.logsumexp(scores, axis=-1) - jax.nn.logsumexp(gold_scores, axis=-1)
    return jnp.where(outputs["span_mask"], per_span, 0.0).sum(-1)
