"""HotpotQA's stage-1 ranking file and stage 2's choice of paragraphs from it.

Stage 1 writes, per question, its paragraphs ranked best first,
`{_id: [[title, score], ...]}` (`write_selection`); stage 2 reads it
(`read_selection`) and keeps the first `keep` titles, adding in training the
gold paragraphs stage 1 missed (`select_paragraphs`; see the choices in
`longjax.data.hotpotqa`'s docstring).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from longjax.data import json_files
from longjax.data import hotpotqa as hotpot


def write_selection(path: str | os.PathLike, ranking: Mapping[str, Sequence[tuple[str, float]]]) -> None:
    """Writes `{_id: [[title, score], ...]}`, each list sorted best first (stably), for `read_selection`.

    Raises:
      ValueError naming the id of a malformed entry, a repeated title or a non-finite score.
    """
    out = {}
    for example_id, pairs in ranking.items():
        if not isinstance(example_id, str):
            raise ValueError(f"ranking: expected string ids, got {example_id!r}")
        checked = _ranked(pairs, f"ranking[{example_id!r}]", ranked=False)
        out[example_id] = sorted(checked, key=lambda pair: -pair[1])
    Path(path).write_text(json.dumps(out, indent=1, ensure_ascii=False), encoding="utf-8")


def read_selection(path: str | os.PathLike) -> dict[str, list[str]]:
    """`{_id: titles, best first}` of a file written by `write_selection`.

    Raises:
      FileNotFoundError naming the path; ValueError naming the file and the id
      of an entry that is not a list of distinct `[title, finite score]` pairs
      in non-increasing score order.
    """
    path = Path(path)
    data = json_files.read_json(path, "a stage-1 selection, written by write_selection")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{_id: [[title, score], ...]}}, got {type(data).__name__}")
    return {example_id: [title for title, _ in _ranked(pairs, f"{path}: id {example_id!r}", ranked=True)]
            for example_id, pairs in data.items()}


def _ranked(pairs, where: str, *, ranked: bool) -> list[tuple[str, float]]:
    if not isinstance(pairs, (list, tuple)):
        raise ValueError(f"{where}: expected a list of [title, score], got {pairs!r}")
    out, titles = [], set()
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], numbers.Real) and not isinstance(pair[1], bool)
                and math.isfinite(pair[1])):
            raise ValueError(f"{where}: expected [title, finite score] pairs, got {pair!r}")
        if pair[0] in titles:
            raise ValueError(f"{where}: title {pair[0]!r} is ranked twice")
        if ranked and out and pair[1] > out[-1][1]:
            raise ValueError(f"{where}: scores are not ranked best first ({pair!r} after {list(out[-1])!r})")
        titles.add(pair[0])
        out.append((pair[0], float(pair[1])))
    return out


def select_paragraphs(example: hotpot.HotpotExample, ranked_titles: Sequence[str] | None, *, keep: int,
                      add_gold: bool) -> list[int]:
    """The context indices of the paragraphs stage 2 sees, in context order (see the module docstring).

    Args:
      ranked_titles: stage 1's titles, best first; None (no stage-1 file) keeps the gold paragraphs only.
      keep: ranked titles kept.
      add_gold: add the gold paragraphs stage 1 missed (training).

    Raises:
      ValueError naming the example when `ranked_titles` is None without
      `add_gold`, `add_gold` is asked of an example without supporting facts,
      a ranked title is not in its context, or nothing is selected.
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    where = f"example {example.id!r}"
    index = {title: p for p, (title, _) in enumerate(example.context)}
    chosen = set()
    if ranked_titles is None:
        if not add_gold:
            raise ValueError(f"{where}: no stage-1 ranking; without one only the gold paragraphs can be taken "
                             "(add_gold=True, training only)")
    else:
        # Every ranked title is checked, not only the kept ones: a ranking of another split fails here.
        unknown = [title for title in ranked_titles if title not in index]
        if unknown:
            raise ValueError(f"{where}: ranked title {unknown[0]!r} is not in its context")
        chosen |= {index[title] for title in ranked_titles[:keep]}
    if add_gold:
        gold = hotpot.gold_titles(example)
        if gold is None:
            raise ValueError(f"{where}: add_gold needs supporting facts, and the example has none (a test file?)")
        chosen |= {index[title] for title in gold}
    if not chosen:
        raise ValueError(f"{where}: no paragraph selected (an empty ranking)")
    return sorted(chosen)


def selections_for(examples: Sequence[hotpot.HotpotExample], ranking: Mapping[str, Sequence[str]] | None, *, keep: int,
                   add_gold: bool, source: str = "selection") -> dict[str, list[int]]:
    """`{_id: select_paragraphs(...)}` for every example; `ranking` as `read_selection` returns it, or None.

    Raises:
      ValueError naming the id and `source` (the stage-1 file) when an example has no ranking.
    """
    out = {}
    for example in examples:
        if ranking is not None and example.id not in ranking:
            raise ValueError(f"{source}: has no ranking for example {example.id!r} (stage 1 run on another split?)")
        ranked = None if ranking is None else ranking[example.id]
        out[example.id] = select_paragraphs(example, ranked, keep=keep, add_gold=add_gold)
    return out
