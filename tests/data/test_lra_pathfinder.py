"""Pathfinder: labels against a flood-fill oracle, determinism, options, the original file layout, LRA's splits.

The oracle reads only the image: the markers are the pixels at 255 (the
generator draws nothing else that bright), which must form two 3x3 squares;
the label is 1 iff both squares lie in one connected component of the nonzero
pixels, 8-connectivity (the generator keeps an empty pixel between different
snakes, so components are snakes).
"""

import numpy as np
import pytest

from longjax.data import lra_pathfinder as pf

SEED = 0
N = 300


@pytest.fixture(scope="module")
def examples():
    return pf.generate(N, seed=SEED)


def _components(mask: np.ndarray) -> np.ndarray:
    """Labels 1..k of the 8-connected components of `mask` (0 off the mask), by flood fill."""
    labels, count = np.zeros(mask.shape, int), 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x], stack = count, [(y, x)]
        while stack:
            cy, cx = stack.pop()
            for ny in range(max(cy - 1, 0), min(cy + 2, mask.shape[0])):
                for nx in range(max(cx - 1, 0), min(cx + 2, mask.shape[1])):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels


def _oracle(image: np.ndarray) -> int:
    markers = _components(image == pf.MARKER_VALUE)
    assert markers.max() == 2, "expected two markers"
    for m in (1, 2):
        ys, xs = np.nonzero(markers == m)
        assert len(ys) == 9 and np.ptp(ys) == 2 and np.ptp(xs) == 2, "a marker is a 3x3 square"
    objects = _components(image > 0)
    return int(len({objects[markers == m][0] for m in (1, 2)}) == 1)


def test_labels_equal_a_flood_fill_oracle_on_the_image(examples):
    images, labels = examples
    assert 0.4 < labels.mean() < 0.6
    assert [_oracle(image) for image in images] == labels.tolist()


def test_labels_equal_the_oracle_for_the_easy_level_and_a_larger_image():
    for options in ({"contour_length": 6}, {"size": 48, "contour_length": 9}):
        images, labels = pf.generate(40, seed=1, **options)
        assert set(labels.tolist()) == {0, 1}
        assert [_oracle(image) for image in images] == labels.tolist()


def test_images_hold_two_contours_markers_and_nothing_else(examples):
    images, _ = examples
    assert images.shape == (N, 32, 32) and images.dtype == np.uint8
    snakes = images[(images > 0) & (images < pf.MARKER_VALUE)]
    assert snakes.min() >= 62 and snakes.max() <= 235  # dim margins, bright paddles, markers alone at 255
    assert ((images == pf.MARKER_VALUE).sum(axis=(1, 2)) == 18).all()
    # two contours of 14 paddles of 2 pixels at least, plus what the markers cover
    assert ((images > 0).sum(axis=(1, 2)) >= 2 * 14 * 2).all()
    assert not images[:, [0, -1], :].any() and not images[:, :, [0, -1]].any()  # the one-pixel padding
    counts = [_components(image > 0).max() for image in images[:50]]
    assert min(counts) >= 2 and max(counts) <= 2 + 5  # the contours and up to 5 distractors (20 // (14 // 3))


def test_the_same_seed_gives_the_same_examples_and_fewer_give_a_prefix(examples):
    images, labels = pf.generate(12, seed=SEED)
    np.testing.assert_array_equal(images, examples[0][:12])
    np.testing.assert_array_equal(labels, examples[1][:12])
    other, _ = pf.generate(12, seed=SEED + 1)
    assert (other != images).any(axis=(1, 2)).all()


def test_generate_example_takes_a_label_and_an_rng():
    for label in (0, 1):
        image, got = pf.generate_example(np.random.default_rng(5), label=label)
        assert got == label == _oracle(image)
    a = pf.generate_example(np.random.default_rng(7))
    b = pf.generate_example(np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.mark.parametrize("options, message", [
    ({"contour_length": 2}, "contour_length must be an integer >= 3"),
    ({"size": 32.0}, "size must be an integer"),
    ({"continuity": 0}, "continuity must be a number"),
    ({"seed_distance": 20}, "seed_distance must leave"),
    ({"num_distractors": -1}, "num_distractors must be an integer >= 0"),
])
def test_a_bad_option_is_named(options, message):
    with pytest.raises(ValueError, match=message):
        pf.generate(1, seed=0, **options)


def test_an_unknown_option_or_label_is_refused():
    with pytest.raises(TypeError, match="unknown Pathfinder option.*'contour'"):
        pf.generate(1, seed=0, contour=3)
    with pytest.raises(ValueError, match="label must be 0, 1 or None"):
        pf.generate_example(np.random.default_rng(0), label=2)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        pf.generate(1, seed=-1)


def test_the_defaults_are_lra_pathfinder32s():
    opts = pf.PathfinderOptions()
    assert (opts.size, opts.contour_length, opts.paddle_length, opts.paddle_margin, opts.continuity,
            opts.seed_distance, opts.padding) == (32, 14, 2, 1, 1.0, 7, 1)
    assert (opts.distractor_length, opts.num_distractors) == (4, 5)
    assert (pf.PathfinderOptions(contour_length=6).distractor_length,
            pf.PathfinderOptions(contour_length=6).num_distractors) == (2, 10)


# --- Files ---------------------------------------------------------------------------------------


def test_the_directory_round_trip_in_the_original_layout(tmp_path, examples):
    images, labels = examples[0][:7], examples[1][:7]
    pf.write_directory(tmp_path, images, labels, images_per_batch=3, options=pf.PathfinderOptions())
    assert sorted(p.name for p in (tmp_path / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    assert sorted(p.name for p in (tmp_path / "imgs" / "1").iterdir()) == [f"sample_{j}.png" for j in range(3)]
    # read as LRA's builder reads it: text lines, fields 0 and 1 the image's path, field 3 the label
    rows = (tmp_path / "metadata" / "1.npy").read_bytes().decode("utf-8").split("\n")[:-1]
    fields = [row.split(" ") for row in rows]
    assert [f[:4] for f in fields] == [["imgs/1", f"sample_{j}.png", str(j), str(labels[3 + j])] for j in range(3)]
    assert fields[0][4:] == ["1.0", "14", "4", "2", "1", "1", "1"]
    got_images, got_labels = pf.read_directory(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int32
    with pytest.raises(FileExistsError, match="metadata"):
        pf.write_directory(tmp_path, images, labels)


def test_batches_are_read_in_numeric_order_and_npy_metadata_is_read(tmp_path, examples):
    images, labels = examples[0][:12], examples[1][:12]
    pf.write_directory(tmp_path, images, labels, images_per_batch=1)  # batches 0..11: '10' sorts before '2' as text
    got_images, _ = pf.read_directory(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    rows = [line.split(" ") for line in (tmp_path / "metadata" / "10.npy").read_text().splitlines()]
    np.save(tmp_path / "metadata" / "10.npy", np.array(rows))  # the original generator's np.save of strings
    np.testing.assert_array_equal(pf.read_directory(tmp_path)[0], images)


def test_a_missing_or_corrupt_file_is_named(tmp_path, examples):
    pf.write_directory(tmp_path, examples[0][:4], examples[1][:4], images_per_batch=2)
    png = tmp_path / "imgs" / "1" / "sample_0.png"
    png.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="sample_0.png"):
        pf.read_directory(tmp_path)
    png.write_bytes(b"")
    assert len(pf.read_directory(tmp_path, skip_empty=True)[0]) == 3  # as LRA's pipeline drops empty images
    png.unlink()
    with pytest.raises(FileNotFoundError, match="imgs/1/sample_0.png"):
        pf.read_directory(tmp_path)
    (tmp_path / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 7\n")
    with pytest.raises(ValueError, match="0.npy: row 0"):
        pf.read_directory(tmp_path)
    with pytest.raises(FileNotFoundError, match="metadata"):
        pf.read_directory(tmp_path / "nowhere")


def test_generate_files_then_load_gives_lra_splits(tmp_path, examples):
    pf.generate_files(tmp_path, seed=SEED, num_examples=20, images_per_batch=8)
    splits = pf.load(tmp_path)
    assert list(splits) == ["train", "validation", "test"]
    assert [len(s["labels"]) for s in splits.values()] == [16, 2, 2]
    inputs = np.concatenate([s["inputs"] for s in splits.values()])
    labels = np.concatenate([s["labels"] for s in splits.values()])
    assert inputs.dtype == labels.dtype == np.int32 and inputs.shape == (20, 32 * 32)
    np.testing.assert_array_equal(inputs, examples[0][:20].reshape(20, -1).astype(np.int32) + 1)
    np.testing.assert_array_equal(labels, examples[1][:20])
    assert inputs.min() >= 1 and inputs.max() < pf.VOCAB_SIZE == 257 and pf.NUM_LABELS == 2


def test_parallel_workers_and_the_command_line_write_the_same_files(tmp_path):
    pf.generate_files(tmp_path / "parallel", seed=3, num_examples=6, images_per_batch=2, workers=2, contour_length=6)
    pf.main(["--out", str(tmp_path / "cli"), "--seed", "3", "--examples", "6", "--images-per-batch", "2",
             "--contour-length", "6"])
    expected = pf.generate(6, seed=3, contour_length=6)
    for name in ("parallel", "cli"):
        got = pf.read_directory(tmp_path / name)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])


def test_a_missing_directory_names_the_command_that_generates_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m longjax.data.lra_pathfinder --out=.*nowhere"):
        pf.load(tmp_path / "nowhere")
