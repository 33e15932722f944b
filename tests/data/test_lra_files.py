"""LRA Text, Retrieval and Image read from files in their real formats.

The tfds datasets (`imdb_reviews`, `cifar10`) are genuinely prepared here, tiny,
without TensorFlow or network: the real builder classes with their generators
replaced by a few examples, written as array_record (and parquet for cifar10).
"""

import json
import zlib

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imdb_reviews import imdb_reviews_dataset_builder
from tensorflow_datasets.image_classification import cifar

from longjax.data import lra_files
from longjax.data import text_classification

_NO_STATS = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)


class _TinyImdb(imdb_reviews_dataset_builder.Builder, skip_registration=True):
    name = "imdb_reviews"
    # No checksums file to look up (tfds would look beside this module, through a package it lacks here).
    code_path = None

    def _split_generators(self, dl_manager):
        def reviews(split, n):
            for i in range(n):
                yield f"{split}{i}", {"text": f"{split} review {i} é{'x' * i}", "label": i % 2}

        return {"train": reviews("train", 40), "test": reviews("test", 6)}


class _TinyCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"
    code_path = None

    def _split_generators(self, dl_manager):
        def images(prefix, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                image = rng.integers(0, 256, lra_files.IMAGE_SHAPE, dtype=np.uint8)
                yield i, {"id": f"{prefix}{i:05d}", "image": PIL.Image.fromarray(image), "label": i % 10}

        return {"train": images("train_", 0, 20), "test": images("test_", 1, 5)}


def _prepare(builder_class, data_dir, file_format="array_record"):
    builder_class(data_dir=str(data_dir), file_format=file_format).download_and_prepare(download_config=_NO_STATS)
    return data_dir


def _as_tfrecord(data_dir, name):
    """Marks a prepared dataset as tfrecord-prepared, as a TensorFlow preparation records it."""
    (info_path,) = data_dir.glob(f"{name}/**/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))


@pytest.fixture(scope="module")
def imdb_dir(tmp_path_factory):
    return _prepare(_TinyImdb, tmp_path_factory.mktemp("tfds_imdb"))


@pytest.fixture(scope="module", params=["array_record", "parquet"])
def cifar_dir(request, tmp_path_factory):
    return _prepare(_TinyCifar10, tmp_path_factory.mktemp(f"tfds_cifar_{request.param}"), request.param)


# --- encodings ---------------------------------------------------------------------------------


def test_bytes_are_ids_byte_plus_one_cut_and_zero_padded():
    ids = lra_files.encode_bytes(["ab", "é", b"\x00\xff"], 3)
    np.testing.assert_array_equal(ids, [[98, 99, 0], [0xC3 + 1, 0xA9 + 1, 0], [1, 256, 0]])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(lra_files.encode_bytes(["abcdef"], 2), [[98, 99]])
    assert lra_files.encode_bytes([], 4).shape == (0, 4)
    with pytest.raises(ValueError, match="seq_len"):
        lra_files.encode_bytes(["a"], 0)


def test_grayscale_of_pure_colours_truncates_as_tensorflow_does():
    pixels = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    # 255.5 * (0.2989 r + 0.5870 g + 0.1140 b) / 255, truncated: pure green is 149.98 -> 149, not 150.
    np.testing.assert_array_equal(lra_files.rgb_to_grayscale(pixels), [0, 255, 76, 149, 29, 18])


def test_grayscale_of_every_colour_is_the_truncated_luma_formula():
    channel = np.arange(256, dtype=np.float64)
    near_boundary = 0
    for r in range(256):
        g, b = np.meshgrid(channel, channel, indexing="ij")
        exact = 255.5 * (0.2989 * r + 0.5870 * g + 0.1140 * b) / 255
        rgb = np.stack([np.full_like(g, r), g, b], -1).astype(np.uint8)
        got = lra_files.rgb_to_grayscale(rgb).astype(np.int64)
        # float32 differs from the exact value only within its rounding of an integer.
        differs = got != np.floor(exact)
        assert np.all(np.abs(exact[differs] - np.round(exact[differs])) < 1e-4)
        near_boundary += int(differs.sum())
    assert near_boundary < 256**3 * 1e-4


def test_image_inputs_are_grayscale_row_major_plus_one():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    inputs = lra_files.image_inputs(images)
    assert inputs.shape == (2, 1024) and inputs.dtype == np.int32
    r, g, b = (images[1, 3, 5, c] / 255 for c in range(3))
    assert inputs[1, 3 * 32 + 5] == int(255.5 * (0.2989 * r + 0.5870 * g + 0.1140 * b)) + 1
    assert inputs.min() >= 1 and inputs.max() <= 256
    with pytest.raises(ValueError, match=r"\[n, 32, 32, 3\]"):
        lra_files.image_inputs(images[:, :16])


def test_image_split_point_rounds_like_tfds_percent_slices():
    assert lra_files.image_split_point(50_000) == 45_000
    assert lra_files.image_split_point(20) == 18
    assert lra_files.image_split_point(25) == 22  # 22.5, rounded half to even as Python's round


# --- Text --------------------------------------------------------------------------------------


def test_text_holds_out_train_reviews_by_the_hash_of_their_id(imdb_dir):
    reviews = text_classification.read_imdb_tfds(imdb_dir)
    tables = lra_files.load_text(imdb_dir, seq_len=24, validation_fraction=0.3)
    held = [zlib.crc32(r.id.encode()) / 2**32 < 0.3 for r in reviews["train"]]
    expected = {
        "train": [r for r, h in zip(reviews["train"], held) if not h],
        "validation": [r for r, h in zip(reviews["train"], held) if h],
        "test": reviews["test"],
    }
    assert set(tables) == set(lra_files.SPLITS)
    assert 0 < len(expected["validation"]) < 40
    for split, records in expected.items():
        assert tables[split]["inputs"].shape == (len(records), 24)
        assert tables[split]["inputs"].dtype == tables[split]["labels"].dtype == np.int32
        np.testing.assert_array_equal(tables[split]["labels"], [r.label for r in records])
        for row, record in zip(tables[split]["inputs"], records):
            data = record.text.encode()[:24]
            np.testing.assert_array_equal(row[: len(data)], np.frombuffer(data, np.uint8) + 1)
            assert not row[len(data):].any()
    assert sorted(len(r.text) for r in reviews["test"]) == sorted(len(f"test review {i} é") + i for i in range(6))


def test_text_refuses_a_tfrecord_preparation_and_an_empty_directory(imdb_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build imdb_reviews"):
        lra_files.load_text(tmp_path)
    copy = tmp_path / "copy"
    _prepare(_TinyImdb, copy)
    _as_tfrecord(copy, "imdb_reviews")
    with pytest.raises(ValueError, match="prepared as tfrecord.*--file_format=array_record"):
        lra_files.load_text(copy)
    with pytest.raises(ValueError, match="validation_fraction"):
        lra_files.load_text(imdb_dir, validation_fraction=0)


# --- Retrieval ---------------------------------------------------------------------------------


def _aan(directory, lines=None):
    directory.mkdir(exist_ok=True)
    lines = lines or {
        "train": [b'1\tp1\tp2\tsays "hi"\tb', b"0.0\tp3\tp4\t\xff\xfe\t"],
        "eval": [b"1.0\tp5\tp6\tc\td"],
        "test": [b"0\tp7\tp8\t" + b"x" * 11_000 + b"\ty"],
    }
    for name, rows in lines.items():
        (directory / f"new_aan_pairs.{name}.tsv").write_bytes(b"\r\n".join(rows) + b"\r\n")
    return directory


def test_retrieval_reads_the_three_tsv_files_byte_level(tmp_path):
    tables = lra_files.load_retrieval(_aan(tmp_path), seq_len=12_000)
    train = tables["train"]
    assert train["inputs"].shape == (2, 2, 12_000) and train["inputs"].dtype == np.int32
    np.testing.assert_array_equal(train["labels"], [1, 0])
    np.testing.assert_array_equal(train["inputs"][0, 0, :9], np.frombuffer(b'says "hi"', np.uint8) + 1)
    np.testing.assert_array_equal(train["inputs"][1, 0, :3], [256, 255, 0])
    assert not train["inputs"][1, 1].any()
    np.testing.assert_array_equal(tables["validation"]["labels"], [1])
    # LRA encodes at most 10,000 bytes of a document, whatever the length.
    assert (tables["test"]["inputs"][0, 0] > 0).sum() == 10_000
    assert lra_files.load_retrieval(tmp_path, seq_len=4)["test"]["inputs"].shape == (1, 2, 4)


def test_a_malformed_pair_line_names_file_and_line(tmp_path):
    _aan(tmp_path, {"train": [b"1\ta\tb\tc\td", b"0\ta\tb\tc"], "eval": [b"2\ta\tb\tc\td"],
                    "test": [b"1\ta\tb\tc\td", b"", b"1\ta\tb\tc\td"]})
    with pytest.raises(ValueError, match=r"new_aan_pairs.train.tsv: line 2: expected 5 tab-separated fields"):
        lra_files.read_aan_pairs(tmp_path / "new_aan_pairs.train.tsv")
    with pytest.raises(ValueError, match=r"new_aan_pairs.eval.tsv: line 1: label b'2' is not 0 or 1"):
        lra_files.read_aan_pairs(tmp_path / "new_aan_pairs.eval.tsv")
    with pytest.raises(ValueError, match=r"new_aan_pairs.test.tsv: line 2: .* got 1"):
        lra_files.read_aan_pairs(tmp_path / "new_aan_pairs.test.tsv")


def test_a_missing_pair_file_is_named(tmp_path):
    _aan(tmp_path)
    (tmp_path / "new_aan_pairs.eval.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"new_aan_pairs.eval.tsv: no such file"):
        lra_files.load_retrieval(tmp_path)


# --- Image -------------------------------------------------------------------------------------


def test_image_splits_train_at_ninety_percent_in_file_order(cifar_dir):
    read = lra_files.read_cifar10_tfds(cifar_dir, chunk=7)
    tables = lra_files.load_image(cifar_dir)
    images, labels = read["train"]
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == sorted(i % 10 for i in range(20))
    assert {k: v["inputs"].shape for k, v in tables.items()} == {
        "train": (18, 1024), "validation": (2, 1024), "test": (5, 1024)}
    both = np.concatenate([tables["train"]["inputs"], tables["validation"]["inputs"]])
    np.testing.assert_array_equal(both, lra_files.image_inputs(images))
    np.testing.assert_array_equal(tables["validation"]["labels"], labels[18:])
    np.testing.assert_array_equal(tables["test"]["inputs"], lra_files.image_inputs(read["test"][0]))
    # The order is tfds' own: its 'train[90%:]' slice holds the same images.
    source = tfds.builder("cifar10", data_dir=str(cifar_dir)).as_data_source("train")
    np.testing.assert_array_equal(np.stack([source[i]["image"] for i in (18, 19)]), images[18:])


def test_image_slices_match_tfds_array_record_slices(tmp_path):
    data_dir = _prepare(_TinyCifar10, tmp_path)
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    tables = lra_files.load_image(data_dir)
    for split, tfds_split in (("train", "train[:90%]"), ("validation", "train[90%:]")):
        source = builder.as_data_source(tfds_split)
        np.testing.assert_array_equal(
            tables[split]["inputs"], lra_files.image_inputs(np.stack([source[i]["image"] for i in range(len(source))])))


def test_image_refuses_a_tfrecord_preparation_and_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        lra_files.load_image(tmp_path)
    copy = _prepare(_TinyCifar10, tmp_path / "copy")
    _as_tfrecord(copy, "cifar10")
    with pytest.raises(ValueError, match="prepared as tfrecord.*--file_format=array_record"):
        lra_files.load_image(copy)
