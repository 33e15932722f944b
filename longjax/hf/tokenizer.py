"""RoBERTa/Longformer/BART tokenizers from a checkpoint directory, with the `tokenizers` library.

`tokenizer.json` holds the whole pipeline; older checkpoints only have
`vocab.json` and `merges.txt`, from which RoBERTa's byte-level BPE is
rebuilt here (transformers 5's `RobertaTokenizerFast(vocab_file=...,
merges_file=...)` ignores both files, so it is not the reference).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

# RoBERTa's special tokens; <mask> swallows the space before it, as in RobertaTokenizer.
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_MASK = "<mask>"


def load_tokenizer(directory: str | os.PathLike, *, add_prefix_space: bool | None = None) -> tokenizers.Tokenizer:
    """The checkpoint's tokenizer.

    Args:
      directory: holds `tokenizer.json`, or `vocab.json` and `merges.txt`
        (RoBERTa's byte-level BPE: `<s> ... </s>` around one sequence,
        `<s> a </s></s> b </s>` around a pair).
      add_prefix_space: for vocab.json/merges.txt, whether a space is put
        before the first word (default: tokenizer_config.json's, else False
        as in roberta-base).

    Returns:
      A `tokenizers.Tokenizer` (`encode(text).ids`, `encode_batch`, `decode`).

    Raises:
      FileNotFoundError naming the directory and the files looked for.
    """
    directory = pathlib.Path(directory)
    if (directory / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(f"{directory}: no tokenizer.json, nor vocab.json and merges.txt")
    if add_prefix_space is None:
        config = directory / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.is_file() else {}
        add_prefix_space = bool(settings.get("add_prefix_space", False))
    tokenizer = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    ids = json.loads(vocab.read_text())
    missing = [t for t in (*_SPECIALS, _MASK) if t not in ids]
    if missing:
        raise ValueError(f"{vocab}: lacks RoBERTa's special tokens {missing}")
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    tokenizer.add_special_tokens([tokenizers.AddedToken(_MASK, lstrip=True, special=True, normalized=False)])
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), add_prefix_space=add_prefix_space
    )
    return tokenizer


def add_task_tokens(tokenizer: tokenizers.Tokenizer, tokens: Sequence[str]) -> list[list[int]]:
    """Adds special task tokens (e.g. `[q] [/q] [ent] [/ent]`) to `tokenizer`, in place.

    Returns:
      For each token, in order, the ids its text had before it was added
      (without `<s>`/`</s>`): the rows `Pretrained.with_new_tokens` averages
      to initialise its embedding, so a new token starts where its spelling was.

    Raises:
      ValueError if a token is already in the vocabulary.
    """
    pieces = []
    for token in tokens:
        if tokenizer.token_to_id(token) is not None:
            raise ValueError(f"tokens: {token!r} is already in the vocabulary (id {tokenizer.token_to_id(token)})")
        pieces.append(tokenizer.encode(token, add_special_tokens=False).ids)
    added = tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])
    if added != len(tokens):
        raise ValueError(f"tokens: added {added} of {len(tokens)} (duplicates in {list(tokens)}?)")
    return pieces
