"""ROUGE-1/2/L/Lsum of summaries with Google's `rouge-score` package (what papers and Hugging Face report).

ROUGE-Lsum is the summary-level LCS over sentences, which `rouge-score`
reads as newline-separated lines; its own sentence splitter needs NLTK data
that may be absent, so references are split where the dataset marks
sentences (arXiv's `<S> ... </S>`) and generated summaries by
`split_sentences`, before scoring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """A generated summary's sentences: split after '.', '!' or '?' followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def rouge(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], *,
          use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE F-measures (x100) of summaries given as lists of sentences.

    Args:
      predictions, references: one list of sentences per summary, aligned.
      use_stemmer: Porter-stem tokens (as Hugging Face's summarization scripts do).

    Returns:
      {'rouge1', 'rouge2', 'rougeL', 'rougeLsum'}: F1 x 100, averaged over summaries.
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) must align")
    if not predictions:
        raise ValueError("rouge: no summaries to score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        # Lsum reads lines as sentences; the others ignore line breaks.
        scores = scorer.score("\n".join(reference), "\n".join(prediction))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
