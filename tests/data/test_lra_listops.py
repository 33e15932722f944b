"""LRA ListOps: values against an independent evaluator, LRA's spelling and files, determinism, encoding, loading."""

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from longjax.data import lra_listops

SMALL = dict(min_length=20, max_length=100)  # short trees, for speed


# --- An independent reading of LRA's format -----------------------------------------------------

_LRA_OPS = {"MIN": min, "MAX": max, "MED": lambda args: int(np.median(args)), "SM": lambda args: int(np.sum(args)) % 10}
_INNERMOST = re.compile(r"\[(MIN|MAX|MED|SM)((?: \d)+) \]")


def reference_value(source):
    """Rewrites the innermost operator applications as their values until one digit is left (LRA's to_value rules)."""
    text = " ".join(source.replace("(", " ").replace(")", " ").split())
    while True:
        text, replaced = _INNERMOST.subn(lambda m: str(_LRA_OPS[m[1]]([int(c) for c in m[2].split()])), text)
        if not replaced:
            break
    assert re.fullmatch(r"\d", text), text
    return int(text)


def parse(source):
    """The n-ary tree: an int, or [operator, arg, ...]."""
    stack = [[]]
    for symbol in source.split():
        if symbol in "()":
            continue
        if symbol.startswith("["):
            stack.append([symbol])
        elif symbol == "]":
            node = stack.pop()
            stack[-1].append(node)
        else:
            stack[-1].append(int(symbol))
    (root,) = stack[0]
    return root


def lra_spelling(node):
    """LRA's to_string of LRA's tree: ((((op, a1), a2), ...), ']'), every pair in parentheses."""
    if isinstance(node, int):
        return str(node)
    pair = (node[0], node[1])
    for arg in node[2:]:
        pair = (pair, arg)
    pair = (pair, "]")

    def to_string(t):
        if isinstance(t, str):
            return t
        if isinstance(t, (int, list)):
            return lra_spelling(t)
        return "( " + to_string(t[0]) + " " + to_string(t[1]) + " )"

    return to_string(pair)


def depth(node):
    return 1 if isinstance(node, int) else 1 + max(depth(arg) for arg in node[1:])


def arities(node):
    return [] if isinstance(node, int) else [len(node) - 1] + [a for arg in node[1:] for a in arities(arg)]


def num_tokens(node):
    return 1 if isinstance(node, int) else 2 + sum(num_tokens(arg) for arg in node[1:])


# --- Values and spelling --------------------------------------------------------------------------


@pytest.mark.parametrize("source, value", [
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),
    ("( ( ( ( [MIN 4 ) 7 ) 5 ) ] )", 4),
    ("( ( ( [MED 3 ) 4 ) ] )", 3),  # int(np.median([3, 4])) = int(3.5)
    ("( ( ( ( ( [MED 9 ) 1 ) 2 ) 8 ) ] )", 5),  # (2 + 8) / 2
    ("( ( ( ( [MED 1 ) 2 ) 9 ) ] )", 2),
    ("( ( ( ( [SM 5 ) 7 ) 9 ) ] )", 1),
    ("( ( ( [MAX ( ( ( [SM 8 ) 4 ) ] ) ) ( ( ( [MIN 1 ) 6 ) ] ) ) ] )", 2),
    ("[MAX 2 [MIN 7 8 ] ]", 7),  # without parentheses, as LRA's model reads it
    ("6", 6),
])
def test_hand_written_values(source, value):
    assert lra_listops.evaluate(source) == value
    assert reference_value(source) == value


def test_generated_values_match_the_independent_evaluator():
    examples = lra_listops.generate(400, seed=1, **SMALL)
    assert len(examples) == 400
    for source, value in examples:
        assert value == reference_value(source) == lra_listops.evaluate(source)
    labels = np.bincount([value for _, value in examples], minlength=10)
    assert (labels > 0).all(), labels


def test_sources_are_spelled_as_lra_writes_them():
    for source, _ in lra_listops.generate(100, seed=2, **SMALL):
        assert source == lra_spelling(parse(source))
    assert lra_spelling(parse("( ( ( [MAX 2 ) 9 ) ] )")) == "( ( ( [MAX 2 ) 9 ) ] )"


def test_evaluate_rejects_malformed_sources():
    for source, message in [("( ( [MAX 2 ) 9 )", r"\[MAX is not closed"), ("[MAX 2 ] ]", "closes no operator"),
                            ("[SM ]", "has no arguments"), ("[MAX 2 ] 3", "one expression, got 2"),
                            ("[AVG 2 3 ]", "unknown token '\\[AVG'")]:
        with pytest.raises(ValueError, match=message):
            lra_listops.evaluate(source)


# --- Generation -----------------------------------------------------------------------------------


def test_deterministic_per_seed_and_prefix_stable():
    first = lra_listops.generate(60, seed=3, **SMALL)
    assert lra_listops.generate(60, seed=3, **SMALL) == first
    assert lra_listops.generate(25, seed=3, **SMALL) == first[:25]
    other = lra_listops.generate(60, seed=4, **SMALL)
    assert not {s for s, _ in first} & {s for s, _ in other}
    assert len({s for s, _ in first}) == 60  # unique, as LRA's set makes them


def test_depth_arguments_and_length_respected():
    trees = [parse(s) for s, _ in lra_listops.generate(300, seed=5, max_depth=3, max_args=3,
                                                       min_length=3, max_length=12)]
    assert {depth(t) for t in trees} == {2, 3}
    assert {a for t in trees for a in arities(t)} == {2, 3}
    assert all(3 < num_tokens(t) < 12 for t in trees)
    examples = lra_listops.generate(200, seed=6, max_args=4, **SMALL)
    lengths = [len(lra_listops.tokenize(s)) for s, _ in examples]
    assert all(20 < n < 100 for n in lengths) and lengths == [num_tokens(parse(s)) for s, _ in examples]
    assert max(depth(parse(s)) for s, _ in examples) <= 10
    assert max(a for s, _ in examples for a in arities(parse(s))) == 4


def lra_tree(rng, node_depth, max_depth, max_args):
    """LRA's recursive generate_tree, on a NumPy Generator, as an n-ary tree."""
    if node_depth < max_depth and rng.random() <= 0.25:
        operator = ("[MIN", "[MAX", "[MED", "[SM")[rng.integers(4)]
        return [operator] + [lra_tree(rng, node_depth + 1, max_depth, max_args) for _ in range(rng.integers(2, max_args + 1))]
    return int(rng.integers(10))


def test_same_distribution_as_lras_recursive_generator():
    rng, reference = np.random.default_rng(0), []
    options = dict(max_depth=6, max_args=6, min_length=10, max_length=80)
    while len(reference) < 1500:
        tree = lra_tree(rng, 1, options["max_depth"], options["max_args"])
        if options["min_length"] < num_tokens(tree) < options["max_length"]:
            reference.append(tree)
    ours = [parse(s) for s, _ in lra_listops.generate(1500, seed=10, **options)]
    for statistic in (num_tokens, depth, lambda t: np.mean(arities(t)), lambda t: lra_listops.evaluate(lra_spelling(t))):
        a, b = np.array([statistic(t) for t in reference]), np.array([statistic(t) for t in ours])
        assert abs(a.mean() - b.mean()) < 4 * np.sqrt((a.var() + b.var()) / 1500), statistic


def test_all_trees_of_a_tiny_space_then_a_clear_error(monkeypatch):
    monkeypatch.setattr(lra_listops, "_MAX_STALE", 20 * lra_listops._BATCH)
    examples = lra_listops.generate(400, seed=0, max_depth=2, max_args=2, min_length=3, max_length=10)
    assert len({s for s, _ in examples}) == 400  # every [OP a b ]: 4 operators, 10 x 10 arguments
    with pytest.raises(ValueError, match="no new tree .* after 400: widen the range or ask for fewer"):
        lra_listops.generate(401, seed=0, max_depth=2, max_args=2, min_length=3, max_length=10)


def test_default_length_range():
    for source, value in lra_listops.generate(4, seed=0):
        assert 500 < len(lra_listops.tokenize(source)) < 2000
        assert value == reference_value(source)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_examples=-1), "num_examples must be an integer >= 0"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(max_depth=0), "max_depth must be an integer >= 1"),
    (dict(max_args=1), "max_args must be an integer >= 2"),
    (dict(min_length=10, max_length=11), "max_length must be an integer >= 12"),
    (dict(max_depth=2, max_args=3, min_length=5), "min_length must be below 5"),
])
def test_generate_validates_its_arguments(kwargs, message):
    kwargs = dict(dict(num_examples=1, seed=0), **kwargs)
    with pytest.raises(ValueError, match=message):
        lra_listops.generate(kwargs.pop("num_examples"), **kwargs)


# --- Vocabulary and encoding ----------------------------------------------------------------------


def test_vocabulary_is_sorted_and_what_lra_tokenises():
    assert lra_listops.VOCABULARY == tuple(sorted(lra_listops.VOCABULARY))
    assert lra_listops.VOCAB_SIZE == len(lra_listops.VOCABULARY) + 1 == 16
    assert lra_listops.PAD_ID == 0 and lra_listops.NUM_LABELS == 10
    seen = {t for s, _ in lra_listops.generate(200, seed=7, **SMALL) for t in lra_listops.tokenize(s)}
    assert seen == set(lra_listops.VOCABULARY)
    assert lra_listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )") == ["[MAX", "2", "9", "X"]


_SUBPROCESS = """
import hashlib, importlib.util, sys
spec = importlib.util.spec_from_file_location("listops", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
examples = module.generate(40, seed=8, min_length=20, max_length=100)
ids = module.encode([s for s, _ in examples], 64)
print(hashlib.sha256(repr((module.VOCABULARY, examples)).encode() + ids.tobytes()).hexdigest())
"""


def test_stable_across_processes_and_hash_seeds():
    examples = lra_listops.generate(40, seed=8, **SMALL)
    ids = lra_listops.encode([s for s, _ in examples], 64)
    here = hashlib.sha256(repr((lra_listops.VOCABULARY, examples)).encode() + ids.tobytes()).hexdigest()
    for hash_seed in ("0", "4242"):
        out = subprocess.run([sys.executable, "-c", _SUBPROCESS, lra_listops.__file__], capture_output=True,
                             text=True, check=True, env=dict(os.environ, PYTHONHASHSEED=hash_seed))
        assert out.stdout.strip() == here


def test_encode_pads_truncates_and_names_unknown_tokens():
    ids = lra_listops.encode(["( ( ( [MAX 2 ) 9 ) ] )", "7"], 6)
    v = {t: i + 1 for i, t in enumerate(lra_listops.VOCABULARY)}
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [[v["[MAX"], v["2"], v["9"], v["X"], 0, 0], [v["7"], 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(lra_listops.encode(["[SM 1 2 3 ]"], 3), [[v["[SM"], v["1"], v["2"]]])
    np.testing.assert_array_equal(lra_listops.encode(["\t[SM\n1  2 ]", "", "(7)"], 4),
                                  [[v["[SM"], v["1"], v["2"], v["X"]], [0, 0, 0, 0], [v["7"], 0, 0, 0]])
    with pytest.raises(ValueError, match=r"source 1: unknown token '\[AVG'"):
        lra_listops.encode(["1", "[AVG 1 2 ]"], 8)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        lra_listops.encode(["1"], 0)


# --- Files ----------------------------------------------------------------------------------------


def test_tsv_round_trip_in_lra_format(tmp_path):
    examples = lra_listops.generate(30, seed=9, **SMALL)
    path = tmp_path / "basic_train.tsv"
    assert lra_listops.write_tsv(path, examples) == 30
    raw = path.read_bytes()
    lines = raw.split(b"\r\n")  # Python's csv writer, as LRA's generator uses it: CRLF
    assert lines[0] == b"Source\tTarget" and lines[-1] == b"" and len(lines) == 32
    assert lines[1] == f"{examples[0][0]}\t{examples[0][1]}".encode()
    assert lra_listops.read_tsv(path) == examples
    path.write_bytes(raw.replace(b"\r\n", b"\n"))  # LF lines read the same
    assert lra_listops.read_tsv(path) == examples
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("text, message", [
    ("Source\tLabel\n", r":1: expected the header"),
    ("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n[MAX 1 2 ]\n", r":3: expected 2 tab-separated fields"),
    ("Source\tTarget\n[MAX 1 2 ]\t12\n", r":2: Target must be an integer 0-9, got '12'"),
    ("Source\tTarget\n\t3\n", r":2: empty Source"),
    ("", ": empty file"),
])
def test_read_tsv_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad.tsv" + message):
        lra_listops.read_tsv(path)


def test_write_tsv_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="example 1: target must be an integer 0-9"):
        lra_listops.write_tsv(tmp_path / "x.tsv", [("1", 1), ("2", 10)])
    with pytest.raises(ValueError, match="example 0: source must be"):
        lra_listops.write_tsv(tmp_path / "x.tsv", [("1\t2", 1)])
    assert not list(tmp_path.iterdir())


def test_generate_files_cli_and_load(tmp_path, capsys):
    options = ["--seed=3", "--train=12", "--validation=5", "--test=4", "--min-length=20", "--max-length=100"]
    lra_listops.main([f"--out={tmp_path / 'a'}", *options])
    printed = capsys.readouterr().out
    assert f"train: 12 examples -> {tmp_path / 'a' / 'basic_train.tsv'}" in printed
    paths = lra_listops.generate_files(tmp_path / "b", seed=3, train=12, validation=5, test=4, **SMALL)
    splits = {}
    for split, name in lra_listops.SPLIT_FILES.items():
        assert paths[split] == tmp_path / "b" / name
        assert (tmp_path / "a" / name).read_bytes() == paths[split].read_bytes()  # deterministic
        splits[split] = lra_listops.read_tsv(paths[split])
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [12, 5, 4]
    assert splits["validation"] != splits["test"][:5] and splits["train"][:4] != splits["test"]  # own sub-seeds
    more = lra_listops.generate_files(tmp_path / "c", seed=3, train=20, validation=5, test=4, **SMALL)
    assert more["test"].read_bytes() == paths["test"].read_bytes()  # a split's size leaves the others alone

    data = lra_listops.load(tmp_path / "b", 64)
    assert sorted(data) == ["test", "train", "validation"]
    for split, table in data.items():
        n = len(splits[split])
        assert table["inputs"].shape == (n, 64) and table["inputs"].dtype == np.int32
        assert table["labels"].shape == (n,) and table["labels"].dtype == np.int32
        np.testing.assert_array_equal(table["labels"], [value for _, value in splits[split]])
        lengths = [len(lra_listops.tokenize(s)) for s, _ in splits[split]]
        np.testing.assert_array_equal((table["inputs"] != lra_listops.PAD_ID).sum(1), np.minimum(lengths, 64))
        np.testing.assert_array_equal(table["inputs"], lra_listops.encode([s for s, _ in splits[split]], 64))


def test_load_names_missing_file_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        lra_listops.load(tmp_path, 32)
    assert str(tmp_path / "basic_train.tsv") in str(error.value)
    assert f"python -m longjax.data.lra_listops --out={tmp_path}" in str(error.value)
    lra_listops.generate_files(tmp_path, train=2, validation=2, test=2, **SMALL)
    (tmp_path / "basic_test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="basic_test.tsv not found"):
        lra_listops.load(tmp_path, 32)


def test_load_names_file_and_line_of_an_unknown_token(tmp_path):
    lra_listops.generate_files(tmp_path, train=2, validation=2, test=2, **SMALL)
    with (tmp_path / "basic_val.tsv").open("a", newline="") as f:
        f.write("( ( ( [AVG 2 ) 9 ) ] )\t5\r\n")
    with pytest.raises(ValueError, match=r"basic_val.tsv:4: unknown token '\[AVG'"):
        lra_listops.load(tmp_path, 32)
