"""Bits per character with the Transformer-XL evaluation protocol.

A text of N characters x[0..N-1] is scored at positions 1..N-1: each x[p] is
predicted from the characters before it. Position 0 has no context and is not
scored (as in Transformer-XL, whose targets are the inputs shifted by one), so
`num_scored == N - 1`.

The text is read in overlapping windows of `eval_len + 1` characters: a
window [s, s + L] gives the model L inputs x[s..s+L-1] and predicts
x[s+1..s+L]. The first window starts at 0 and scores all its L predictions.
Every later window ends `step` (S) characters further on and scores only its
last S predictions, which therefore see between L - S + 1 and L characters of
context. The last window is aligned to the end of the text and scores only the
characters not yet scored, so every position is scored exactly once, with as
much left context as L allows. (Longformer's setting: L = 32,256, S = 512.)

All windows have the same length, min(L + 1, N), so a jitted model is traced
once; the last batch of windows is padded with copies of the last window whose
scores are discarded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Window(NamedTuple):
    """Characters x[start:end] go to the model; positions first_scored..end-1 are scored."""

    start: int
    end: int
    first_scored: int


@dataclasses.dataclass(frozen=True)
class BpcResult:
    """Total bits, number of characters scored and their ratio, bits per character."""

    total_bits: float
    num_scored: int
    bpc: float


def plan_windows(text_length: int, *, eval_len: int, step: int = 512) -> list[Window]:
    """The evaluation windows of a text of `text_length` characters, in order.

    Args:
      text_length: N >= 2.
      eval_len: L, the number of predictions per window (the model's sequence length).
      step: S, 1 <= S <= L, the characters scored per window after the first.

    Returns:
      Windows with `end - start == min(L + 1, N)` whose scored ranges
      `[first_scored, end)` partition `[1, N)`.
    """
    if text_length < 2:
        raise ValueError(f"text_length must be at least 2 (one scored character), got {text_length}")
    if eval_len < 1:
        raise ValueError(f"eval_len must be positive, got {eval_len}")
    if not 1 <= step <= eval_len:
        raise ValueError(f"step must be in [1, eval_len={eval_len}], got {step}")
    last = text_length - 1
    covered = min(eval_len, last)
    windows = [Window(0, covered + 1, 1)]
    while covered < last:
        end = min(covered + step, last)
        windows.append(Window(end - eval_len, end + 1, covered + 1))
        covered = end
    return windows


def evaluate_bpc(
    log_prob_fn: Callable,
    data,
    *,
    eval_len: int,
    step: int = 512,
    batch_size: int = 1,
) -> BpcResult:
    """Bits per character of `data` under the model behind `log_prob_fn`.

    Args:
      log_prob_fn: `tokens int32 [batch_size, n] -> [batch_size, n - 1]` natural-log
        probabilities (nats) of tokens[:, 1:] given the tokens before them in the same
        row, float32 or wider, numpy or jax. n is min(eval_len + 1, len(data)) on every
        call, so a jitted function compiles once.
      data: token ids `[chars]`, any integer dtype (e.g. `Corpus.validation`).
      eval_len, step: see `plan_windows`.
      batch_size: windows per call.

    Returns:
      `BpcResult(total_bits, num_scored, bpc)` with num_scored == len(data) - 1.
    """
    tokens = np.asarray(data)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"data must be a 1-D integer array of token ids, got {tokens.dtype} {tokens.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = plan_windows(len(tokens), eval_len=eval_len, step=step)
    width = windows[0].end - windows[0].start
    starts = np.array([w.start for w in windows], np.int64)
    first_scored = np.array([w.first_scored for w in windows], np.int64)
    num_batches = -(-len(windows) // batch_size)
    padding = num_batches * batch_size - len(windows)
    starts = np.concatenate([starts, np.full(padding, starts[-1])])
    first_scored = np.concatenate([first_scored, np.full(padding, first_scored[-1])])
    real = np.arange(len(starts)) < len(windows)
    rows = np.lib.stride_tricks.sliding_window_view(tokens, width)
    # Predicted position of each output column, relative to the window start.
    offsets = np.arange(1, width, dtype=np.int64)

    total_nats, num_scored = 0.0, 0

    def accumulate(log_probs, batch: slice):
        nonlocal total_nats, num_scored
        log_probs = np.asarray(log_probs, np.float64)
        if log_probs.shape != (batch_size, width - 1):
            raise ValueError(
                f"log_prob_fn must return [batch, n - 1] = {(batch_size, width - 1)} for tokens "
                f"{(batch_size, width)}, got {log_probs.shape}"
            )
        scored = (starts[batch, None] + offsets >= first_scored[batch, None]) & real[batch, None]
        total_nats += float(log_probs[scored].sum())
        num_scored += int(scored.sum())

    pending = None
    for b in range(num_batches):
        batch = slice(b * batch_size, (b + 1) * batch_size)
        # Dispatch the next batch before reading back the previous one, so host and device overlap.
        out = log_prob_fn(rows[starts[batch]].astype(np.int32))
        if pending is not None:
            accumulate(*pending)
        pending = (out, batch)
    accumulate(*pending)

    if num_scored != len(tokens) - 1:
        raise AssertionError(f"scored {num_scored} characters of {len(tokens)}; the window plan is wrong")
    total_bits = -total_nats / math.log(2)
    return BpcResult(total_bits=total_bits, num_scored=num_scored, bpc=total_bits / num_scored)
