"""LRA's ListOps (Nangia & Bowman 2018; Tay et al. 2021), generated offline into LRA's own TSV files.

An example is a nested expression over the digits 0-9 with the operators MAX,
MIN, MED (median: `int(np.median(args))`, the mean of the two middle values
rounded down when there is an even number of them) and SM (sum mod 10); its
label is the expression's value.

Files, as LRA's generator writes them: `basic_train.tsv`, `basic_val.tsv`,
`basic_test.tsv`; a `Source<TAB>Target` header, then one `source<TAB>value`
row per example, lines ending in CRLF (Python's csv writer). The source is
spelled as LRA spells its binary trees: an operator applied to a1..an is
n + 1 opening parentheses, the operator, each argument followed by `)`, then
`] )`, every symbol separated by one space. MAX(2, 9) is

    ( ( ( [MAX 2 ) 9 ) ] )

and a nested argument is itself such a group. Tokens are what LRA's input
pipeline makes of a source: parentheses deleted, `]` renamed `X`, split on
whitespace; so MAX(2, 9) is the 4 tokens `[MAX 2 9 X`, and lengths here count
these tokens (as LRA's generator does). Ids are 1 + the token's index in the
sorted `VOCABULARY`, 0 is padding.

The generator samples LRA's distribution (a node above `max_depth` is an
operator with probability 1/4, with 2..max_args arguments and a uniform
operator, else a uniform digit; the root is at depth 1, so brackets nest at
most max_depth - 1 deep) and keeps the unique trees with
min_length < length < max_length (strict, as in LRA). Unlike LRA's, it is
seeded, and no result depends on set or hash order. Trees grow level by level
in batches, in NumPy, a tree dropped as soon as it must reach max_length.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")  # LRA's order; sampled uniformly
VOCABULARY = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "X", "[MAX", "[MED", "[MIN", "[SM")
PAD_ID = 0
VOCAB_SIZE = len(VOCABULARY) + 1  # the pad id and the tokens' ids 1..15
NUM_LABELS = 10
HEADER = "Source\tTarget"
SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}

_OPERATOR_P = 0.25  # LRA's VALUE_P: a node above max_depth is an operator when random() <= 0.25
_BATCH = 1024  # trees tried at once; fixed, so a seed's examples do not depend on how many are asked for
_MAX_STALE = 1_000 * _BATCH  # trees tried without a new one kept before generate gives up
_TOKEN_ID = {token: i + 1 for i, token in enumerate(VOCABULARY)}
_BYTES_ID = {token.encode(): i for token, i in _TOKEN_ID.items()}
_RENAME = bytes.maketrans(b"]", b"X")  # with b"()" deleted: what LRA's pipeline does to a source
_X_ID = _TOKEN_ID["X"]
_OP_IDS = np.array([_TOKEN_ID[op] for op in OPERATORS], np.int32)
_VALUE_IDS = np.array([_TOKEN_ID[str(v)] for v in range(10)], np.int32)
# Symbol codes for the source text: the token ids, then '(' and ')'; each symbol's text ends in a space.
_OPEN, _CLOSE = VOCAB_SIZE, VOCAB_SIZE + 1
_SYMBOL_TEXT = [""] + [("]" if t == "X" else t) + " " for t in VOCABULARY] + ["( ", ") "]
_SYMBOL_LEN = np.array([len(s) for s in _SYMBOL_TEXT])
_SYMBOL_BYTES = np.array([list(s.encode().ljust(5)) for s in _SYMBOL_TEXT], np.uint8)


def _tokens(source: str) -> list[bytes]:
    return source.encode().translate(_RENAME, b"()").split()


def tokenize(source: str) -> list[str]:
    """The tokens LRA's input pipeline makes of a source: `(` and `)` deleted, `]` renamed `X`, split on (ASCII) whitespace."""
    return [token.decode() for token in _tokens(source)]


def _median(args: Sequence[int]) -> int:
    ordered = sorted(args)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) // 2


_APPLY: dict[str, Callable[[list[int]], int]] = {
    "[MIN": min, "[MAX": max, "[MED": _median, "[SM": lambda args: sum(args) % 10}
_DIGITS = {str(v): v for v in range(10)}


def evaluate(source: str) -> int:
    """The value (0-9) of a source expression, read from its tokens (parentheses are ignored, as LRA's model ignores them).

    Raises:
      ValueError for an unknown token, an operator without arguments, an
      unclosed operator, a stray `]`, or not exactly one top-level value.
    """
    stack: list[tuple[str, list[int]]] = [("", [])]
    for token in tokenize(source):
        if token in _APPLY:
            stack.append((token, []))
        elif token == "X":
            if len(stack) == 1:
                raise ValueError(f"source {source[:80]!r}: ']' closes no operator")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"source {source[:80]!r}: {op} has no arguments")
            stack[-1][1].append(_APPLY[op](args))
        elif token in _DIGITS:
            stack[-1][1].append(_DIGITS[token])
        else:
            raise ValueError(f"source {source[:80]!r}: unknown token {token!r}; ListOps tokens are {VOCABULARY}")
    if len(stack) != 1:
        raise ValueError(f"source {source[:80]!r}: {stack[-1][0]} is not closed")
    if len(stack[0][1]) != 1:
        raise ValueError(f"source {source[:80]!r}: expected one expression, got {len(stack[0][1])} values")
    return stack[0][1][0]


# --- Generation -------------------------------------------------------------------------------


def _grow(rng: np.random.Generator, max_depth: int, max_args: int, max_length: int):
    """Grows _BATCH trees level by level; returns the levels [(tree, op, value, nargs)] and each tree's length.

    A node's op is an index into OPERATORS, or -1 for a value; a level's nodes
    are its trees' nodes left to right, the children of an operator contiguous
    in the next level. A tree that must reach max_length tokens stops growing
    and gets length -1.
    """
    tree = np.arange(_BATCH)
    tokens = np.zeros(_BATCH, np.int64)
    alive = np.ones(_BATCH, bool)
    levels = []
    for depth in range(1, max_depth + 1):
        n = tree.size
        if n == 0:
            break
        is_op = rng.random(n) <= _OPERATOR_P if depth < max_depth else np.zeros(n, bool)
        nargs = np.where(is_op, rng.integers(2, max_args + 1, n), 0)
        op = np.where(is_op, rng.integers(0, len(OPERATORS), n), -1)
        levels.append((tree, op, rng.integers(0, 10, n), nargs))
        tokens += np.bincount(tree, 1 + is_op, minlength=_BATCH).astype(np.int64)  # an operator and its ']'
        pending = np.bincount(tree, nargs, minlength=_BATCH).astype(np.int64)  # each child is a token at least
        alive &= tokens + pending < max_length
        tree = np.repeat(tree, nargs)
        tree = tree[alive[tree]]
    return levels, np.where(alive, tokens, -1)


def _assemble(levels, keep: np.ndarray, lengths: np.ndarray) -> Iterator[tuple[str, int]]:
    """The kept trees (in order; `lengths` theirs) as (LRA source, value), computed for all at once."""
    kept = [(op[m], value[m], nargs[m]) for tree, op, value, nargs in levels if (m := keep[tree]).any()]
    depth = len(kept)
    sizes, values, firsts = [None] * depth, [None] * depth, [None] * depth
    for d in reversed(range(depth)):  # bottom-up: subtree sizes in tokens and values
        op, value, nargs = kept[d]
        is_op = op >= 0
        size, value = np.ones(op.size, np.int64), value.copy()
        firsts[d] = np.cumsum(nargs) - nargs  # an operator's first child in the next level
        if is_op.any():
            starts, k = firsts[d][is_op], nargs[is_op]
            args = values[d + 1]
            size[is_op] = 2 + np.add.reduceat(sizes[d + 1], starts)
            ordered = np.sort(np.repeat(np.arange(k.size), k) * 10 + args) % 10  # each group's args, sorted
            median = (ordered[starts + (k - 1) // 2] + ordered[starts + k // 2]) // 2
            results = (np.minimum.reduceat(args, starts), np.maximum.reduceat(args, starts), median,
                       np.add.reduceat(args, starts) % 10)
            value[is_op] = np.choose(op[is_op], results)
        sizes[d], values[d] = size, value
    ids = np.empty(int(lengths.sum()), np.int32)
    opens, closes = np.zeros(ids.size, np.int64), np.zeros(ids.size, np.int64)
    position = np.cumsum(lengths) - lengths  # top-down: each node's first token
    for d in range(depth):
        op, value, nargs = kept[d]
        is_op, last = op >= 0, position + sizes[d] - 1
        ids[position] = np.where(is_op, _OP_IDS[op], _VALUE_IDS[value])
        ids[last[is_op]] = _X_ID
        opens[position[is_op]] = nargs[is_op] + 1  # '(' before an operator: one per argument, one for ']'
        closes[last[is_op]] += 1  # ')' after ']'
        if d:
            closes[last] += 1  # ')' after an argument
        if d + 1 < depth:
            parent = np.repeat(np.arange(op.size), nargs)
            before = np.cumsum(sizes[d + 1]) - sizes[d + 1]
            position = position[parent] + 1 + before - before[firsts[d][parent]]
    count = opens + 1 + closes  # symbols per token: its '('s, itself, its ')'s
    start = np.cumsum(count) - count
    offset, before = np.arange(count.sum()) - np.repeat(start, count), np.repeat(opens, count)
    codes = np.where(offset < before, _OPEN, np.where(offset == before, np.repeat(ids, count), _CLOSE))
    text = _SYMBOL_BYTES[codes][np.arange(5) < _SYMBOL_LEN[codes][:, None]].tobytes()
    ends = np.cumsum(_SYMBOL_LEN[codes])[np.cumsum(count)[np.cumsum(lengths) - 1] - 1]
    for begin, end, root in zip(itertools.chain([0], ends), ends, values[0]):
        yield text[begin:end - 1].decode("ascii"), int(root)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_options(max_depth, max_args, min_length, max_length) -> tuple[int, int, int, int]:
    max_depth = _check_int("max_depth", max_depth, 1)
    max_args = _check_int("max_args", max_args, 2)
    min_length = _check_int("min_length", min_length, 0)
    max_length = _check_int("max_length", max_length, min_length + 2)
    longest = 1
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest
    if longest <= min_length:
        raise ValueError(f"min_length must be below {longest}, the most tokens a tree of max_depth={max_depth} and "
                         f"max_args={max_args} has; got {min_length}")
    return max_depth, max_args, min_length, max_length


def _examples(seed, max_depth, max_args, min_length, max_length) -> Iterator[tuple[str, int]]:
    """An endless stream of unique examples, a function of the seed and the options only."""
    rng, seen, stale = np.random.default_rng(seed), set(), 0
    while True:
        levels, lengths = _grow(rng, max_depth, max_args, max_length)
        keep = lengths > min_length
        stale += _BATCH
        if keep.any():
            for source, value in _assemble(levels, keep, lengths[keep]):
                digest = hashlib.blake2b(source.encode(), digest_size=16).digest()
                if digest not in seen:  # a membership test: no set order reaches the results
                    seen.add(digest)
                    stale = 0
                    yield source, value
        if stale >= _MAX_STALE:
            raise ValueError(f"no new tree of min_length={min_length} < length < max_length={max_length} tokens "
                             f"(max_depth={max_depth}, max_args={max_args}) in {stale} tries, after {len(seen)}: "
                             "widen the range or ask for fewer")


def generate(num_examples: int, *, seed: int | np.random.SeedSequence, max_depth: int = 10, max_args: int = 10,
             min_length: int = 500, max_length: int = 2000) -> list[tuple[str, int]]:
    """`num_examples` unique (source, value) pairs of LRA's ListOps distribution (see the module docstring).

    Args:
      num_examples: how many.
      seed: seeds a NumPy Generator; the same seed and options give the same
        examples, and asking for fewer gives a prefix.
      max_depth: the deepest node (root at 1; brackets nest at most max_depth - 1 deep).
      max_args: an operator has 2..max_args arguments.
      min_length, max_length: kept trees have min_length < tokens < max_length.
    """
    num_examples = _check_int("num_examples", num_examples, 0)
    if not isinstance(seed, np.random.SeedSequence):
        seed = _check_int("seed", seed, 0)
    options = _check_options(max_depth, max_args, min_length, max_length)
    return list(itertools.islice(_examples(seed, *options), num_examples))


# --- Files ------------------------------------------------------------------------------------


def write_tsv(path: str | os.PathLike, examples: Iterable[tuple[str, int]]) -> int:
    """Writes (source, value) pairs as LRA does (header `Source<TAB>Target`, CRLF lines); returns how many.

    The file appears whole or not at all (written beside it, then renamed).
    Raises ValueError for a source with a tab, newline or quote, or a value outside 0-9.
    """
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8", newline="") as f:
            f.write(HEADER + "\r\n")
            for count, (source, target) in enumerate(examples, 1):
                if not isinstance(source, str) or not source.strip() or any(c in source for c in '\t\r\n"'):
                    raise ValueError(f"example {count - 1}: source must be a non-empty string without tabs, "
                                     f"newlines or quotes, got {str(source)[:80]!r}")
                if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target <= 9:
                    raise ValueError(f"example {count - 1}: target must be an integer 0-9, got {target!r}")
                f.write(f"{source}\t{int(target)}\r\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def read_tsv(path: str | os.PathLike) -> list[tuple[str, int]]:
    """The (source, value) rows of an LRA ListOps TSV file (ours or LRA's released ones; CRLF or LF lines).

    Raises:
      ValueError naming the file and line for a wrong header, a line without
      exactly two tab-separated fields, an empty source, or a target other than 0-9.
    """
    path = pathlib.Path(path)
    rows, number = [], 0
    with path.open(encoding="utf-8", newline="") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if number == 1:
                if line != HEADER:
                    raise ValueError(f"{path}:1: expected the header {HEADER!r}, got {line[:80]!r}")
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected 2 tab-separated fields (Source, Target), "
                                 f"got {len(fields)}: {line[:80]!r}")
            source, target = fields
            if not source.strip():
                raise ValueError(f"{path}:{number}: empty Source")
            if len(target) != 1 or not target.isdigit():
                raise ValueError(f"{path}:{number}: Target must be an integer 0-9, got {target[:80]!r}")
            rows.append((source, int(target)))
    if number == 0:
        raise ValueError(f"{path}: empty file, expected the header {HEADER!r}")
    return rows


def _encode(sources: Iterable[str], seq_len: int, where: Callable[[int], str]) -> np.ndarray:
    """`encode`; `where(row)` names a source in errors."""
    sources = list(sources)
    seq_len = _check_int("seq_len", seq_len, 1)
    out = np.full((len(sources), seq_len), PAD_ID, np.int32)
    lookup = _BYTES_ID.__getitem__
    for row, source in enumerate(sources):
        tokens = _tokens(source)
        try:
            ids = np.fromiter(map(lookup, tokens), np.int32, len(tokens))
        except KeyError as e:
            token = e.args[0].decode(errors="replace")
            raise ValueError(f"{where(row)}: unknown token {token!r}; ListOps tokens are {VOCABULARY}") from None
        out[row, :min(ids.size, seq_len)] = ids[:seq_len]
    return out


def encode(sources: Iterable[str], seq_len: int) -> np.ndarray:
    """Token ids, int32 [n, seq_len], padded with PAD_ID; a longer source is truncated to its first seq_len tokens (as LRA does).

    Raises ValueError naming the source's index and the token for a token not in VOCABULARY.
    """
    return _encode(sources, seq_len, lambda row: f"source {row}")


def _command(directory: pathlib.Path) -> str:
    return f"python -m longjax.data.lra_listops --out={shlex.quote(str(directory))}"


def generate_files(directory: str | os.PathLike, *, seed: int = 0, train: int = 96_000, validation: int = 2_000,
                   test: int = 2_000, max_depth: int = 10, max_args: int = 10, min_length: int = 500,
                   max_length: int = 2000) -> dict[str, pathlib.Path]:
    """Generates LRA's three ListOps files in `directory` (created if need be); returns {split: path}.

    Each split has its own sub-seed of `seed` (SeedSequence(seed).spawn(3)),
    so one split's size does not change another's examples. Examples are unique
    within a split; across splits a repeat is possible only for short ranges
    (at the default 500-2,000 tokens, the chance is nil). The other options are `generate`'s.
    """
    seed = _check_int("seed", seed, 0)
    counts = {"train": _check_int("train", train, 0), "validation": _check_int("validation", validation, 0),
              "test": _check_int("test", test, 0)}
    options = _check_options(max_depth, max_args, min_length, max_length)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for (split, count), sub_seed in zip(counts.items(), np.random.SeedSequence(seed).spawn(3)):
        paths[split] = directory / SPLIT_FILES[split]
        write_tsv(paths[split], itertools.islice(_examples(sub_seed, *options), count))
    return paths


def load(directory: str | os.PathLike, seq_len: int) -> dict[str, dict[str, np.ndarray]]:
    """The splits 'train', 'validation', 'test' (basic_train/val/test.tsv): {"inputs": int32 [n, seq_len], "labels": int32 [n]}.

    Raises:
      FileNotFoundError naming a missing file and the command that generates it;
      ValueError naming the file and line of a malformed row or unknown token.
    """
    directory = pathlib.Path(directory)
    _check_int("seq_len", seq_len, 1)
    splits = {}
    for split, name in SPLIT_FILES.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; generate LRA's ListOps files with: {_command(directory)}")
        rows = read_tsv(path)
        inputs = _encode((source for source, _ in rows), seq_len, lambda row: f"{path}:{row + 2}")
        splits[split] = {"inputs": inputs, "labels": np.array([target for _, target in rows], np.int32).reshape(-1)}
    return splits


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: generates the three files (see `generate_files`) and says what it wrote."""
    parser = argparse.ArgumentParser(prog="python -m longjax.data.lra_listops", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for basic_{train,val,test}.tsv")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in (("train", 96_000), ("validation", 2_000), ("test", 2_000)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"examples in the {name} split")
    for name, default, what in (("max-depth", 10, "deepest node, the root at 1"), ("max-args", 10, "most arguments"),
                                ("min-length", 500, "tokens > this"), ("max-length", 2000, "tokens < this")):
        parser.add_argument(f"--{name}", type=int, default=default, help=what)
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    try:
        paths = generate_files(args.out, seed=args.seed, train=args.train, validation=args.validation,
                               test=args.test, max_depth=args.max_depth, max_args=args.max_args,
                               min_length=args.min_length, max_length=args.max_length)
    except ValueError as e:
        parser.error(str(e))
    for split, path in paths.items():
        print(f"{split}: {getattr(args, split)} examples -> {path}")
    print(f"seed {args.seed}, {time.perf_counter() - begin:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
