"""Greedy and beam search with Hugging Face `generate`'s semantics, jit-compiled as one `lax.while_loop`.

The searches know nothing of the model: they call `step(tokens, cache) ->
(logits, cache)` with the last token of every hypothesis (`[rows, 1]`) and a
cache pytree whose arrays lead with the row axis (reordered when beams are
reselected; scalars such as cache indices are shared and left alone).

Semantics follow transformers' `generate` (v5's vectorised beam search):
lengths count the decoder start token; the log-probabilities pass through the
logits processors in Hugging Face's order (no-repeat n-gram, min length,
forced BOS, forced EOS); each step keeps the top `2 * num_beams`
continuations; a hypothesis ending in EOS (or reaching `max_length`) among
the top `num_beams` is scored `sum_logprobs / generated_length **
length_penalty`; `early_stopping` True stops a source once it has
`num_beams` finished hypotheses, False stops when the best running beam at
its current length cannot beat the worst finished one, 'never' when it
cannot at `max_length` (for a positive length penalty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1.0e9  # Hugging Face's "excluded" score, added rather than assigned, as there


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What `generate` does; the fields and defaults of Hugging Face's GenerationConfig that it honours.

    Attributes:
      max_length: tokens of an output, counting `decoder_start_token_id`.
      min_length: EOS is forbidden while a hypothesis is shorter (same counting).
      num_beams: 1 is greedy search.
      length_penalty: finished beam scores are `sum_logprobs / generated ** length_penalty`.
      early_stopping: True, False or 'never' (see the module docstring).
      no_repeat_ngram_size: no n-gram of this size occurs twice in a hypothesis (0: off).
      forced_bos_token_id: the first generated token, if set.
      forced_eos_token_id: the token at position `max_length - 1`, if set.
      decoder_start_token_id: the first decoder input.
      eos_token_id: ends a hypothesis (None: only max_length does).
      pad_token_id: fills outputs after their end.
      num_return_sequences: best hypotheses returned per source (<= num_beams).
    """

    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    decoder_start_token_id: int = 2
    eos_token_id: int | None = 2
    pad_token_id: int = 1
    num_return_sequences: int = 1

    def __post_init__(self):
        def non_negative(name, minimum=0):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"decode.{name} must be an int >= {minimum}, got {value!r}")

        non_negative("max_length", 2)
        non_negative("min_length")
        non_negative("num_beams", 1)
        non_negative("no_repeat_ngram_size")
        non_negative("num_return_sequences", 1)
        non_negative("decoder_start_token_id")
        non_negative("pad_token_id")
        for name in ("forced_bos_token_id", "forced_eos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                non_negative(name)
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"decode.early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise ValueError(f"decode.length_penalty must be a number, got {self.length_penalty!r}")
        if self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"decode.num_return_sequences ({self.num_return_sequences}) must be <= decode.num_beams ({self.num_beams})"
            )


class Generated(NamedTuple):
    """Outputs of a search, best first.

    sequences: int32 `[batch, num_return_sequences, max_length]`, starting
      with the decoder start token, `pad_token_id` after each one's end.
    scores: float32 `[batch, num_return_sequences]`: beam search's
      length-penalised score; greedy search's sum of processed log-probabilities.
    lengths: int32 `[batch, num_return_sequences]`: tokens of each sequence, the start token and EOS included.
    """

    sequences: jax.Array
    scores: jax.Array
    lengths: jax.Array


def process_log_probs(log_probs, sequences, cur_len, settings: GenerationSettings):
    """Hugging Face's logits processors, in its order, on `[rows, vocab]` scores of the token at `cur_len`.

    Args:
      log_probs: float32 `[rows, vocab]`.
      sequences: int `[rows, max_length]` whose first `cur_len` tokens are the hypotheses so far.
      cur_len: int scalar (traced), tokens so far.
      settings: which processors apply.
    """
    vocab = log_probs.shape[-1]
    tokens = jnp.arange(vocab)
    inf = jnp.float32(-jnp.inf)
    n = settings.no_repeat_ngram_size
    if n:
        log_probs = jnp.where(_banned_ngram_tokens(sequences, cur_len, n, vocab), inf, log_probs)
    if settings.min_length and settings.eos_token_id is not None:
        log_probs = jnp.where((cur_len < settings.min_length) & (tokens == settings.eos_token_id), inf, log_probs)
    for forced, at in ((settings.forced_bos_token_id, 1), (settings.forced_eos_token_id, settings.max_length - 1)):
        if forced is not None:
            only = jnp.where(tokens == forced, jnp.float32(0.0), inf)
            log_probs = jnp.where(cur_len == at, only[None, :], log_probs)
    return log_probs


def _banned_ngram_tokens(sequences, cur_len, n: int, vocab: int):
    """bool `[rows, vocab]`: tokens that would repeat an n-gram of the first `cur_len` tokens."""
    rows, length = sequences.shape
    if length < n:
        return jnp.zeros((rows, vocab), bool)
    starts = length - n + 1
    windows = jnp.stack([sequences[:, j : starts + j] for j in range(n)], axis=-1)  # [rows, starts, n]
    prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - n + 1, 0), n - 1, axis=1)
    complete = jnp.arange(starts) + n <= cur_len  # the window lies inside the hypothesis
    match = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1) & complete[None, :] & (cur_len >= n)
    row = jnp.broadcast_to(jnp.arange(rows)[:, None], match.shape)
    return jnp.zeros((rows, vocab), bool).at[row, windows[..., -1]].max(match)


def _reorder(cache, rows):
    """The cache with its row axis gathered by `rows`; row-less leaves (scalar indices) unchanged."""
    return jax.tree_util.tree_map(lambda a: a[rows] if getattr(a, "ndim", 0) >= 1 else a, cache)


Step = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def greedy_search(step: Step, cache, batch: int, settings: GenerationSettings) -> Generated:
    """Greedy decoding of `batch` sources (Hugging Face's `num_beams=1`, no sampling); rows of `cache` = batch."""
    s = settings
    sequences = jnp.full((batch, s.max_length), s.pad_token_id, jnp.int32).at[:, 0].set(s.decoder_start_token_id)
    state = dict(
        cur_len=jnp.int32(1), sequences=sequences, running=jnp.ones((batch,), bool),
        scores=jnp.zeros((batch,), jnp.float32), lengths=jnp.full((batch,), s.max_length, jnp.int32), cache=cache,
    )

    def cond(st):
        return (st["cur_len"] < s.max_length) & jnp.any(st["running"])

    def body(st):
        cur_len = st["cur_len"]
        tokens = jax.lax.dynamic_slice_in_dim(st["sequences"], cur_len - 1, 1, axis=1)
        logits, cache = step(tokens, st["cache"])
        log_probs = process_log_probs(jax.nn.log_softmax(logits.astype(jnp.float32)), st["sequences"], cur_len, s)
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        running = st["running"]
        chosen = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        token = jnp.where(running, token, s.pad_token_id)
        ends = running & (token == s.eos_token_id) if s.eos_token_id is not None else jnp.zeros_like(running)
        return dict(
            cur_len=cur_len + 1,
            sequences=jax.lax.dynamic_update_slice_in_dim(st["sequences"], token[:, None], cur_len, axis=1),
            running=running & ~ends, scores=st["scores"] + jnp.where(running, chosen, 0.0),
            lengths=jnp.where(ends, cur_len + 1, st["lengths"]), cache=cache,
        )

    st = jax.lax.while_loop(cond, body, state)
    lengths = jnp.minimum(st["lengths"], st["cur_len"])
    return Generated(st["sequences"][:, None], st["scores"][:, None], lengths[:, None])


def beam_search(step: Step, cache, batch: int, settings: GenerationSettings) -> Generated:
    """Beam search of `batch` sources with Hugging Face's semantics; rows of `cache` = batch * num_beams.

    Row `b * num_beams + k` of the cache and of `step`'s tokens is beam k of source b.
    """
    s = settings
    beams, length = s.num_beams, s.max_length
    keep = 2 * beams  # Hugging Face keeps max(2, 1 + number of EOS tokens) * num_beams candidates
    lp = float(s.length_penalty)
    running_sequences = jnp.full((batch, beams, length), s.pad_token_id, jnp.int32)
    running_sequences = running_sequences.at[:, :, 0].set(s.decoder_start_token_id)
    state = dict(
        cur_len=jnp.int32(1),
        running_sequences=running_sequences,
        # Only the first beam is live at the start, so the beams do not all pick the same tokens.
        running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(_NEG),
        sequences=running_sequences,
        scores=jnp.full((batch, beams), _NEG, jnp.float32),
        finished=jnp.zeros((batch, beams), bool),
        lengths=jnp.zeros((batch, beams), jnp.int32),
        improvable=jnp.ones((batch, 1), bool),
        done=jnp.bool_(False),
        cache=cache,
    )
    top_beams = jnp.arange(keep) < beams
    gather = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    def body(st):
        cur_len = st["cur_len"]
        flat = st["running_sequences"].reshape(batch * beams, length)
        tokens = jax.lax.dynamic_slice_in_dim(flat, cur_len - 1, 1, axis=1)
        logits, cache = step(tokens, st["cache"])
        log_probs = process_log_probs(jax.nn.log_softmax(logits.astype(jnp.float32)), flat, cur_len, s)
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, beams, vocab) + st["running_scores"][:, :, None]
        top_scores, top_index = jax.lax.top_k(log_probs.reshape(batch, beams * vocab), keep)
        source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_sequences = gather(st["running_sequences"], source_beam)
        top_sequences = jax.lax.dynamic_update_slice_in_dim(top_sequences, token[:, :, None], cur_len, axis=2)
        hits = jnp.broadcast_to(cur_len + 1 >= length, token.shape)
        if s.eos_token_id is not None:
            hits = hits | (token == s.eos_token_id)

        # The best `beams` continuations that did not just end run on.
        running_candidates = top_scores + hits.astype(jnp.float32) * _NEG
        next_index = jax.lax.top_k(running_candidates, beams)[1]
        running_sequences = gather(top_sequences, next_index)
        running_scores = gather(running_candidates, next_index)
        parents = gather(source_beam, next_index)

        # Continuations among the top `beams` that ended join the finished ones if they beat them.
        just_finished = hits & top_beams[None, :]
        finished_scores = top_scores / (cur_len.astype(jnp.float32) ** lp)
        if s.early_stopping is True:
            full = jnp.all(st["finished"], axis=-1, keepdims=True)
            finished_scores = finished_scores + full.astype(jnp.float32) * _NEG
        finished_scores = finished_scores + (~st["improvable"]).astype(jnp.float32) * _NEG
        finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([st["scores"], finished_scores], axis=1)
        best = jax.lax.top_k(merged_scores, beams)[1]
        sequences = gather(jnp.concatenate([st["sequences"], top_sequences], axis=1), best)
        scores = gather(merged_scores, best)
        finished = gather(jnp.concatenate([st["finished"], just_finished], axis=1), best)
        new_lengths = jnp.broadcast_to(cur_len + 1, token.shape).astype(jnp.int32)
        lengths = gather(jnp.concatenate([st["lengths"], new_lengths], axis=1), best)

        rows = (jnp.arange(batch)[:, None] * beams + parents).reshape(-1)
        cache = _reorder(cache, rows)
        cur_len = cur_len + 1
        if s.early_stopping == "never" and lp > 0.0:
            best_length = jnp.float32(length - 1)
        else:
            best_length = (cur_len - 1).astype(jnp.float32)
        best_possible = running_scores[:, :1] / best_length**lp
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        improvable = st["improvable"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        open_beam = ~(jnp.all(finished) & (s.early_stopping is True))
        done = ~(jnp.any(improvable) & open_beam & ~jnp.all(hits))
        return dict(
            cur_len=cur_len, running_sequences=running_sequences, running_scores=running_scores,
            sequences=sequences, scores=scores, finished=finished, lengths=lengths, improvable=improvable,
            done=done, cache=cache,
        )

    st = jax.lax.while_loop(lambda st: ~st["done"] & (st["cur_len"] < length), body, state)
    r = s.num_return_sequences
    return Generated(st["sequences"][:, :r], st["scores"][:, :r], st["lengths"][:, :r])


def search(step: Step, cache, batch: int, settings: GenerationSettings) -> Generated:
    """Greedy search for `num_beams == 1`, beam search otherwise."""
    if settings.num_beams == 1:
        return greedy_search(step, cache, batch, settings)
    return beam_search(step, cache, batch, settings)
