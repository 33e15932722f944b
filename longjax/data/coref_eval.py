"""Coreference metrics: MUC, B-cubed, CEAF-phi4 and the CoNLL F1 (their mean).

The reference implementation is the Perl `reference-coreference-scorers`;
the one Python package of these metrics, scorch (LoicGrobol/scorch), last
released 0.2.0 in 2020, is unmaintained (its CEAF raises on Python 3.11 where
precision or recall is 0) and returns one clustering's (R, P, F) without the
counts a corpus average needs. So the three metrics are implemented here from
their papers, checked against the papers' worked examples and against scorch
on random corpora (tests/data/test_coref_eval.py):

* MUC (Vilain et al. 1995): recall = sum over key clusters K of
  (|K| - |p(K)|) / sum (|K| - 1), where p(K) partitions K by the response
  clusters and every mention of K the response lacks is a part of its own.
  Precision swaps key and response. A singleton holds no link, so it adds
  nothing to either sum.
* B-cubed (Bagga and Baldwin 1998): recall averages, over the key's mentions,
  |K(m) & R(m)| / |K(m)|, R(m) the response cluster holding m (empty when the
  response lacks m); precision swaps the roles. Singletons count here.
* CEAF-phi4 (Luo 2005), entity-based: phi4(K, R) = 2 |K & R| / (|K| + |R|),
  the one-to-one alignment of key and response clusters maximising the summed
  phi4 (the Hungarian algorithm); recall = that sum / number of key clusters,
  precision = that sum / number of response clusters.

All three are micro-averaged over a corpus, as the CoNLL-2012 scorer and
Lee et al.'s `CorefEvaluator` (which Joshi et al. and the Longformer paper use)
do: numerators and denominators are summed over documents before dividing.
An empty side gives precision (or recall) 0, never a division error.

Those `CorefEvaluator` B-cubed and CEAF drop singleton clusters; these do not
(the definitions and the CoNLL scorer keep them). On OntoNotes the two agree:
its gold clusters hold no singletons and a span-ranking model's clusters are
built from antecedent links, so they hold none either.

A mention is any hashable value; the coreference task uses `(start, end)`
subtoken spans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

Cluster = Sequence[Hashable]


def _clusters(clusters: Iterable[Cluster], name: str) -> list[frozenset]:
    """Clusters as sets, refusing a mention in two clusters (the metrics are undefined there)."""
    if isinstance(clusters, (str, bytes)):
        raise TypeError(f"{name}: expected a list of clusters (lists of mentions), got the string {clusters!r}")
    seen: dict[Hashable, int] = {}
    out = []
    for index, cluster in enumerate(clusters):
        mentions = [tuple(m) if isinstance(m, list) else m for m in cluster]
        if not mentions:
            raise ValueError(f"{name}[{index}]: an empty cluster")
        for mention in mentions:
            if mention in seen and seen[mention] != index:
                raise ValueError(f"{name}: mention {mention!r} is in clusters {seen[mention]} and {index}; "
                                 "a mention belongs to one cluster")
            seen[mention] = index
        out.append(frozenset(mentions))
    return out


def _index(clusters: list[frozenset]) -> dict[Hashable, frozenset]:
    return {mention: cluster for cluster in clusters for mention in cluster}


@dataclasses.dataclass
class Counts:
    """A metric's summed precision and recall fractions over documents."""

    precision_numerator: float = 0.0
    precision_denominator: float = 0.0
    recall_numerator: float = 0.0
    recall_denominator: float = 0.0

    def add(self, other: "Counts") -> None:
        self.precision_numerator += other.precision_numerator
        self.precision_denominator += other.precision_denominator
        self.recall_numerator += other.recall_numerator
        self.recall_denominator += other.recall_denominator

    @property
    def precision(self) -> float:
        return self.precision_numerator / self.precision_denominator if self.precision_denominator else 0.0

    @property
    def recall(self) -> float:
        return self.recall_numerator / self.recall_denominator if self.recall_denominator else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _muc_side(keys: list[frozenset], response: dict[Hashable, frozenset]) -> tuple[float, float]:
    numerator = denominator = 0.0
    for cluster in keys:
        # Mentions missing from the response are one part each; the others are grouped by their response cluster.
        parts = len({response[m] for m in cluster if m in response}) + sum(1 for m in cluster if m not in response)
        numerator += len(cluster) - parts
        denominator += len(cluster) - 1
    return numerator, denominator


def _b_cubed_side(keys: list[frozenset], response: dict[Hashable, frozenset]) -> tuple[float, float]:
    numerator = denominator = 0.0
    for cluster in keys:
        for mention in cluster:
            other = response.get(mention)
            if other is not None:
                numerator += len(cluster & other) / len(cluster)
        denominator += len(cluster)
    return numerator, denominator


def muc(key: Iterable[Cluster], response: Iterable[Cluster]) -> Counts:
    """MUC counts of one document (see the module docstring)."""
    key, response = _clusters(key, "key"), _clusters(response, "response")
    r_num, r_den = _muc_side(key, _index(response))
    p_num, p_den = _muc_side(response, _index(key))
    return Counts(p_num, p_den, r_num, r_den)


def b_cubed(key: Iterable[Cluster], response: Iterable[Cluster]) -> Counts:
    """B-cubed counts of one document (see the module docstring)."""
    key, response = _clusters(key, "key"), _clusters(response, "response")
    r_num, r_den = _b_cubed_side(key, _index(response))
    p_num, p_den = _b_cubed_side(response, _index(key))
    return Counts(p_num, p_den, r_num, r_den)


def ceaf_phi4(key: Iterable[Cluster], response: Iterable[Cluster]) -> Counts:
    """Entity-based CEAF (phi4 similarity) counts of one document (see the module docstring)."""
    key, response = _clusters(key, "key"), _clusters(response, "response")
    total = 0.0
    if key and response:
        similarity = np.array([[2.0 * len(k & r) / (len(k) + len(r)) for r in response] for k in key])
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        total = float(similarity[rows, cols].sum())
    return Counts(total, float(len(response)), total, float(len(key)))


_METRICS = {"muc": muc, "b_cubed": b_cubed, "ceaf_phi4": ceaf_phi4}


class CorefScorer:
    """Accumulates MUC, B-cubed and CEAF-phi4 over documents; `result()` gives them and the CoNLL F1.

    Usage: `scorer.update(gold_clusters, predicted_clusters)` per document, then `scorer.result()`.
    """

    def __init__(self):
        self.counts = {name: Counts() for name in _METRICS}
        self.documents = 0

    def update(self, key: Iterable[Cluster], response: Iterable[Cluster]) -> None:
        """Adds one document: `key` its gold clusters, `response` the predicted ones (lists of mentions)."""
        key, response = list(key), list(response)
        for name, metric in _METRICS.items():
            self.counts[name].add(metric(key, response))
        self.documents += 1

    def result(self) -> dict[str, float | int]:
        """Percentages: `{metric}_precision|_recall|_f1` for each metric, `conll_f1` (the three F1s' mean), `documents`.

        Raises:
          ValueError if no document was added.
        """
        if not self.documents:
            raise ValueError("CorefScorer.result: no document was added")
        out: dict[str, float | int] = {}
        for name, counts in self.counts.items():
            out[f"{name}_precision"] = 100.0 * counts.precision
            out[f"{name}_recall"] = 100.0 * counts.recall
            out[f"{name}_f1"] = 100.0 * counts.f1
        out["conll_f1"] = sum(out[f"{name}_f1"] for name in _METRICS) / len(_METRICS)
        out["documents"] = self.documents
        return out
