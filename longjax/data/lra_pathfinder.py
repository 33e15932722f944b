"""LRA's Pathfinder (Linsley et al. 2018; Tay et al. 2021) at 32x32: a NumPy generator, the original files, splits.

An image holds two long contours, a few short distractor snakes and two
markers; the label is 1 when both markers sit on the ends of one contour, 0
when they sit on ends of the two different contours. A contour is a chain of
`contour_length` paddles (`paddle_length` pixels, then `paddle_margin` pixels
to the next), each turned from the one before by an angle drawn with weight
cos(continuity * angle)^2, so by less than 90 / continuity degrees: the rule of
the original generator (drewlinsley/pathfinder, `snakes.get_coords_cmf`). As
there, both contours start near the centre, `seed_distance` pixels apart, and
one marker sits on one of these starts, the other on a far end, so the
markers' positions do not give the label away.

Defaults are LRA's Pathfinder32 parameters (the `Pathfinder32` docstring in
google-research/long-range-arena `lra_benchmarks/data/pathfinder.py`): 32x32,
padding 1, paddle_length 2, paddle_margin 1, continuity 1.0, seed_distance 7,
marker radius 1.5, contour_length 14, distractor_length = contour_length // 3,
num_distractors = 20 // distractor_length (4 and 5 here). LRA's three levels
are directories generated with contour length 6, 9 and 14 (the generator's
`snakes2_wrapper.py`): 'easy' = curv_baseline, 'intermediate' =
curv_contour_length_9, 'hard' = curv_contour_length_14. The default, 14, is
'hard', the level LRA's builder documents; `--contour-length=6` or `9` gives the others.

Departures from the original (whose script needs SciPy and NumPy functions since removed):
  - one-pixel lines, not antialiased strokes: paddle pixels are bright
    (164-235) and the margin between paddles is dim (62-90) rather than empty,
    so a contour is one 8-connected set of nonzero pixels;
  - different snakes never touch: an empty pixel separates them, and a snake
    keeps clear of its own older paddles. The 8-connected components of the
    nonzero pixels are the snakes, and the label is whether both markers lie in one;
  - a marker is the 3x3 square within radius 1.5 of a contour's end, at 255,
    the only pixels that bright; room for one is kept at all four contour ends;
  - no single-paddle distractors (LRA's 32 px data has none either).

Files, in the generator's layout: `root/imgs/<batch>/sample_<j>.png` (8-bit
grayscale, j counting within the batch) and `root/metadata/<batch>.npy`, a
line per image: `imgs/<batch> sample_<j>.png <j> <label> <continuity>
<contour_length> <distractor_length> <paddle_length> <paddle_thickness>
<paddle_margin> <paddle contrasts>`. LRA's builder reads these files as text,
fields 0 and 1 the image's path and 3 the label, so they are text (as in
LRA's released data) despite the suffix; `read_directory` also reads a true .npy.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import logging
import multiprocessing
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Pixel values 0..255 as ids 1..256; 0 is padding. (LRA feeds raw pixels, and its encoder masks every
# id 0 as padding: the black background, most of each image, attends to nothing there.)
VOCAB_SIZE = 257
NUM_LABELS = 2
MARKER_VALUE = 255
SPLITS = ("train", "validation", "test")
_SPLIT_ENDS = (0.8, 0.9, 1.0)  # LRA's input_pipeline: split[:80%], [80%:90%], [90%:]
_TOTAL_DISTRACTOR_PADDLES = 20  # LRA: num_distractor_snakes = 20 // distractor_length
_NEIGHBOURS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
_PADDLE_LEVELS = (235.0, 100.0)  # value at a pixel centre, loss per pixel of distance from it
_GAP_LEVELS = (90.0, 40.0)
_START_DIRECTIONS = 36  # first paddle: one of 36 directions around a random angle
_TURNS = 19  # later paddles: 19 turns evenly inside (-90, 90) / continuity degrees
_MAX_ATTEMPTS = 200  # fresh starts of the two contours before giving up
_DISTRACTOR_RETRIES = 4  # the original's max_distractor_contour_retrial
_BACKTRACKS = 20  # paddles withdrawn while growing one snake before it starts afresh


@dataclasses.dataclass(frozen=True)
class PathfinderOptions:
    """The generator's parameters (defaults: LRA's Pathfinder32, see the module docstring).

    Attributes:
      size: image height and width in pixels.
      contour_length: paddles per contour, at least 3 (LRA: 6 easy, 9 intermediate, 14 hard).
      paddle_length: pixels per paddle.
      paddle_margin: pixels between consecutive paddles of a snake (drawn dim).
      continuity: a turn between paddles stays below 90 / continuity degrees.
      seed_distance: pixels between the starts of the two contours.
      distractor_length: paddles per distractor; None: contour_length // 3 (at least 1).
      num_distractors: distractor snakes; None: 20 // distractor_length.
      padding: snakes keep this many pixels from the image border, markers one more.
    """

    size: int = 32
    contour_length: int = 14
    paddle_length: int = 2
    paddle_margin: int = 1
    continuity: float = 1.0
    seed_distance: int = 7
    distractor_length: int | None = None
    num_distractors: int | None = None
    padding: int = 1

    def __post_init__(self):
        for name, minimum in (("size", 12), ("contour_length", 3), ("paddle_length", 1), ("paddle_margin", 0),
                              ("seed_distance", 3), ("padding", 1)):
            _check_int(name, getattr(self, name), minimum)
        if isinstance(self.continuity, bool) or not isinstance(self.continuity, (int, float)) or \
                not 1 <= self.continuity <= 10:
            raise ValueError(f"continuity must be a number in [1, 10] (turns below 90 degrees), got {self.continuity!r}")
        if self.distractor_length is None:
            object.__setattr__(self, "distractor_length", max(1, self.contour_length // 3))
        _check_int("distractor_length", self.distractor_length, 1)
        if self.num_distractors is None:
            object.__setattr__(self, "num_distractors", _TOTAL_DISTRACTOR_PADDLES // self.distractor_length)
        _check_int("num_distractors", self.num_distractors, 0)
        if 2 * self.seed_distance + 2 * self.padding + 4 > self.size:
            raise ValueError(f"seed_distance must leave both contour starts inside the image: at most "
                             f"{(self.size - 2 * self.padding - 4) // 2} for size={self.size}, got {self.seed_distance}")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _options(options: dict) -> PathfinderOptions:
    names = [f.name for f in dataclasses.fields(PathfinderOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"unknown Pathfinder option(s) {unknown}; expected some of {names}")
    return PathfinderOptions(**options)


# --- Generation -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Geometry:
    step: int  # pixels from one paddle's start to the next one's
    reach: int  # margin of the grids around the image: no sampled pixel or neighbour falls beyond it
    t: np.ndarray  # positions sampled along a paddle and the margin after it
    t_last: np.ndarray  # along the last paddle only
    bright: np.ndarray  # which of t lie on the paddle
    starts: np.ndarray  # direction offsets of a first paddle, and their weights
    start_weights: np.ndarray
    turns: np.ndarray  # direction offsets of later paddles, and their weights
    turn_weights: np.ndarray
    border: np.ndarray  # the blocked grid of an empty image: True outside the padding


@functools.lru_cache(maxsize=16)
def _geometry(opts: PathfinderOptions) -> _Geometry:
    step = opts.paddle_length + opts.paddle_margin
    t = np.arange(2 * step + 1) / 2  # half-pixel spacing: rounded samples form an 8-connected path
    on_paddle = t <= opts.paddle_length - 1
    limit = np.pi / 2 / opts.continuity
    turns = np.linspace(-limit, limit, _TURNS + 2)[1:-1]
    starts = np.arange(_START_DIRECTIONS) * (2 * np.pi / _START_DIRECTIONS)
    reach = step + 2
    border = np.ones((opts.size + 2 * reach,) * 2, bool)
    inner = slice(reach + opts.padding, reach + opts.size - opts.padding)
    border[inner, inner] = False
    return _Geometry(step, reach, t, t[on_paddle], on_paddle, starts, np.ones(_START_DIRECTIONS), turns,
                     np.cos(turns * opts.continuity) ** 2, border)


def _hold(grid: np.ndarray, pixels: np.ndarray, reach: int):
    """Marks the pixels and their 8 neighbours in a grid indexed by pixel + reach."""
    near = (pixels.reshape(-1, 1, 2) + (_NEIGHBOURS + reach)).reshape(-1, 2)
    grid[near[:, 0], near[:, 1]] = True


def _candidates(blocked: np.ndarray, geo: _Geometry, paddle: int, start, heading: float, last: bool, marked: bool):
    """Every direction the next paddle may take from `start`: (weights, headings, sampled points [c, m, 2] and
    their pixels [c, m, 2])."""
    headings = heading + (geo.starts if paddle == 0 else geo.turns)
    t = geo.t_last if last else geo.t
    points = np.empty((len(headings), len(t), 2))
    np.multiply.outer(np.sin(headings), t, out=points[..., 0])
    np.multiply.outer(np.cos(headings), t, out=points[..., 1])
    points += start
    pixels = np.rint(points).astype(np.intp)
    checked = pixels + geo.reach
    if last and marked:  # the marker's square must fit too
        checked = np.concatenate([checked, checked[:, -1:, :] + _NEIGHBOURS], axis=1)
    free = ~blocked[checked[..., 0], checked[..., 1]].any(axis=1)
    return np.where(free, geo.start_weights if paddle == 0 else geo.turn_weights, 0.0), headings, points, pixels


def _grow(rng, blocked: np.ndarray, geo: _Geometry, start: np.ndarray, length: int, square: np.ndarray | None):
    """Grows a snake of `length` paddles from pixel `start`, where `blocked` (indexed by pixel + reach) says
    where no pixel may go; a paddle keeps clear of the snake's own paddles older than the one before last,
    and from the third on of its `square` (a contour's marker square at the start, whose end gets one too).

    Depth first: a paddle that leaves no way on is withdrawn and another direction tried, up to
    _BACKTRACKS times. Returns (pixels [p, 2], their values [p]) or None.
    """
    frames = []  # per placed paddle: [own older paddles, weights, headings, points, pixels, pick]
    own, point, heading = np.zeros_like(blocked), start.astype(np.float64), rng.uniform(0, 2 * np.pi)
    withdrawn = 0
    while len(frames) < length:
        paddle = len(frames)
        if paddle >= 2:
            own = own.copy()
            if paddle == 2 and square is not None:
                _hold(own, square, geo.reach)
            if paddle >= 3:
                older = frames[paddle - 3]
                _hold(own, older[4][older[5]], geo.reach)
        frames.append([own, *_candidates(blocked | own, geo, paddle, point, heading, paddle == length - 1,
                                         square is not None), None])
        while not frames[-1][1].any():
            frames.pop()
            withdrawn += 1
            if not frames or withdrawn > _BACKTRACKS:
                return None
            frames[-1][1][frames[-1][5]] = 0.0  # that direction led nowhere
        frame = frames[-1]
        cumulative = np.cumsum(frame[1])
        pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(cumulative) - 1)
        frame[5] = pick
        own, heading, point = frame[0], frame[2][pick], frame[3][pick, -1]  # the next paddle starts where this ends
    points = np.concatenate([f[3][f[5]] for f in frames])
    pixels = np.concatenate([f[4][f[5]] for f in frames])
    bright = np.concatenate([geo.bright[:f[4].shape[1]] for f in frames])
    distance = np.hypot(*(points - pixels).T)
    values = np.where(bright, _PADDLE_LEVELS[0] - _PADDLE_LEVELS[1] * distance,
                      _GAP_LEVELS[0] - _GAP_LEVELS[1] * distance)
    return pixels, values


def _two_contours(rng, blocked: np.ndarray, opts: PathfinderOptions, geo: _Geometry):
    """Both contours: ([starts], [ends], [(pixels, values)]), holding them in `blocked`; None if they got stuck."""
    # The first start lies in the central square the original's border mask leaves (rows 14-17 at 32 px).
    low = max(opts.padding + 1, min(2 * opts.seed_distance, (opts.size - 1) // 2 - 1))
    first = rng.integers(low, opts.size - low, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    second = first + np.rint(opts.seed_distance * np.array([np.sin(angle), np.cos(angle)])).astype(np.intp)
    squares = [first + _NEIGHBOURS, second + _NEIGHBOURS]
    for square in squares:
        if blocked[square[:, 0] + geo.reach, square[:, 1] + geo.reach].any():
            return None
    others = blocked.copy()
    _hold(others, squares[1], geo.reach)
    drawn = []
    for square in squares:
        grown = _grow(rng, others, geo, square[4], opts.contour_length, square)
        if grown is None:
            return None
        drawn.append(grown)
        others = blocked.copy()
        for (pixels, _), held in zip(drawn, squares):
            _hold(others, np.concatenate([pixels, held, pixels[-1] + _NEIGHBOURS]), geo.reach)
    blocked[...] = others
    return [first, second], [pixels[-1] for pixels, _ in drawn], drawn


def generate_example(rng: np.random.Generator, *, label: int | None = None, **options) -> tuple[np.ndarray, int]:
    """One Pathfinder image and its label.

    Args:
      rng: the only source of randomness.
      label: 1 (markers on both ends of one contour) or 0 (on ends of the two
        contours); None: drawn from `rng`, each with probability 1/2.
      **options: `PathfinderOptions` fields: size=32, contour_length=14,
        paddle_length=2, paddle_margin=1, continuity=1.0, seed_distance=7,
        distractor_length=contour_length // 3, num_distractors=20 // distractor_length, padding=1.

    Returns:
      (uint8 [size, size] image, label). Background 0, snakes 62-235, the two
      3x3 markers 255; different snakes are separated by at least one empty pixel.

    Raises:
      TypeError for an unknown option, ValueError naming a bad one, RuntimeError
      when the two contours do not fit after many tries (too long for the size).
    """
    if label is not None and (label not in (0, 1) or isinstance(label, bool)):
        raise ValueError(f"label must be 0, 1 or None, got {label!r}")
    return _example(rng, label, _options(options))


def _example(rng: np.random.Generator, label: int | None, opts: PathfinderOptions) -> tuple[np.ndarray, int]:
    if label is None:
        label = int(rng.integers(2))
    geo = _geometry(opts)
    for _ in range(_MAX_ATTEMPTS):
        blocked = geo.border.copy()
        placed = _two_contours(rng, blocked, opts, geo)
        if placed is not None:
            break
    else:
        raise RuntimeError(f"two contours of contour_length={opts.contour_length} did not fit a {opts.size}x{opts.size} "
                           f"image in {_MAX_ATTEMPTS} tries: shorten them or enlarge the image")
    starts, ends, drawn = placed
    for _ in range(opts.num_distractors):
        for _ in range(_DISTRACTOR_RETRIES + 1):  # as the original, a distractor that does not fit is left out
            free = np.flatnonzero(~blocked)
            if free.size == 0:
                break
            start = np.array(np.unravel_index(rng.choice(free), blocked.shape)) - geo.reach
            grown = _grow(rng, blocked, geo, start, opts.distractor_length, None)
            if grown is not None:
                _hold(blocked, grown[0], geo.reach)
                drawn.append(grown)
                break
    canvas = np.zeros((opts.size, opts.size))
    pixels, values = (np.concatenate(parts) for parts in zip(*drawn))
    np.maximum.at(canvas, (pixels[:, 0], pixels[:, 1]), values)
    image = np.rint(canvas).astype(np.uint8)
    first = int(rng.integers(2))  # whose start carries a marker
    for tip in (starts[first], ends[first if label else 1 - first]):
        image[tip[0] - 1:tip[0] + 2, tip[1] - 1:tip[1] + 2] = MARKER_VALUE
    return image, int(label)


def _generate_range(seed: int, begin: int, end: int, opts: PathfinderOptions) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((end - begin, opts.size, opts.size), np.uint8)
    labels = np.empty(end - begin, np.int32)
    for i in range(begin, end):
        images[i - begin], labels[i - begin] = _example(np.random.default_rng([seed, i]), None, opts)
    return images, labels


def generate(num_examples: int, *, seed: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """`num_examples` examples: (uint8 [n, size, size] images, int32 [n] labels).

    Example i is drawn from its own generator, `np.random.default_rng([seed, i])`,
    so it depends on the seed, i and the options only: asking for fewer gives a
    prefix. Labels are drawn per example (1/2 each). Options: see `generate_example`.
    """
    num_examples = _check_int("num_examples", num_examples, 0)
    seed = _check_int("seed", seed, 0)
    return _generate_range(seed, 0, num_examples, _options(options))


# --- Files ------------------------------------------------------------------------------------


def _metadata_tail(opts: PathfinderOptions | None) -> str:
    if opts is None:
        return " ".join(["None"] * 7)
    values = (opts.continuity, opts.contour_length, opts.distractor_length, opts.paddle_length, 1, opts.paddle_margin, 1)
    return " ".join(str(v) for v in values)  # paddle_thickness: one pixel; one paddle contrast


def _existing_metadata(root: pathlib.Path):
    if any((root / "metadata").glob("*.npy")):
        raise FileExistsError(f"{root / 'metadata'} already holds metadata files; remove them or choose another directory")


def _write_batch(root: pathlib.Path, batch: int, images: np.ndarray, labels: np.ndarray, tail: str):
    from PIL import Image  # noqa: PLC0415 (generation itself needs NumPy only)
    folder = root / "imgs" / str(batch)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for j, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"sample_{j}.png", format="PNG")
        lines.append(f"imgs/{batch} sample_{j}.png {j} {int(label)} {tail}\n")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    path = root / "metadata" / f"{batch}.npy"
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(lines), encoding="ascii")
    os.replace(partial, path)  # a batch's metadata appears after its images, whole


def write_directory(root: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *, images_per_batch: int = 1000,
                    options: PathfinderOptions | None = None) -> pathlib.Path:
    """Writes images and labels in the generator's layout (see the module docstring); returns `root`.

    Batch b holds examples b * images_per_batch onwards. `options`, when given,
    fills the metadata's parameter columns (else they read 'None').
    Raises ValueError for images that are not uint8 [n, h, w] or labels not 0/1
    of the same length, FileExistsError when root/metadata already holds files.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 [n, height, width], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be {images.shape[0]} values in {{0, 1}}, got shape {labels.shape}")
    images_per_batch = _check_int("images_per_batch", images_per_batch, 1)
    root = pathlib.Path(root)
    _existing_metadata(root)
    for batch, begin in enumerate(range(0, len(images), images_per_batch)):
        end = begin + images_per_batch
        _write_batch(root, batch, images[begin:end], labels[begin:end], _metadata_tail(options))
    return root


def _metadata_rows(path: pathlib.Path) -> list[list[str]]:
    data = path.read_bytes()
    try:
        if data.startswith(b"\x93NUMPY"):  # the original generator's np.save of a string array
            rows = np.load(io.BytesIO(data), allow_pickle=False)
            rows = [[str(v) for v in row] for row in np.atleast_2d(rows)] if rows.size else []
        else:
            rows = [line.split(" ") for line in data.decode("utf-8").split("\n") if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable Pathfinder metadata ({e})") from None
    for j, row in enumerate(rows):
        if len(row) < 4 or row[3] not in ("0", "1"):
            raise ValueError(f"{path}: row {j} must be 'subdirectory file index label ...' with label 0 or 1, got {row}")
    return rows


def _read_png(path: pathlib.Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image named in the metadata not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L") if image.mode != "L" else image)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def read_directory(root: str | os.PathLike, *, skip_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reads the generator's layout: (uint8 [n, h, w] images, int32 [n] labels).

    Order: metadata files by batch number, then their rows in order (which is
    generation order). `skip_empty` drops zero-byte images, as LRA's input
    pipeline does for its released data.
    Raises FileNotFoundError naming a missing directory or image, ValueError
    naming a corrupt metadata file or image or one whose size differs.
    """
    root = pathlib.Path(root)
    folder = root / "metadata"
    files = sorted(folder.glob("*.npy"), key=lambda f: (0, int(f.stem), "") if f.stem.isdigit() else (1, 0, f.stem))
    if not files:
        raise FileNotFoundError(f"{folder}: no metadata/<batch>.npy files (expected the Pathfinder layout "
                                f"root/metadata/<batch>.npy, root/imgs/<batch>/sample_<j>.png)")
    images, labels = [], []
    for path in files:
        for row in _metadata_rows(path):
            image_path = root / row[0] / row[1]
            if skip_empty and image_path.is_file() and image_path.stat().st_size == 0:
                continue
            image = _read_png(image_path)
            if images and image.shape != images[0].shape:
                raise ValueError(f"{image_path}: shape {image.shape}, but earlier images are {images[0].shape}")
            images.append(image)
            labels.append(int(row[3]))
    if not images:
        raise ValueError(f"{root}: the metadata names no readable image")
    return np.stack(images).astype(np.uint8), np.array(labels, np.int32)


def _command(root: pathlib.Path) -> str:
    return f"python -m longjax.data.lra_pathfinder --out={shlex.quote(str(root))}"


def _make_batch(root: pathlib.Path, seed: int, opts: PathfinderOptions, batch: int, begin: int, end: int) -> int:
    images, labels = _generate_range(seed, begin, end, opts)
    _write_batch(root, batch, images, labels, _metadata_tail(opts))
    return end


def generate_files(root: str | os.PathLike, *, seed: int = 0, num_examples: int = 200_000,
                   images_per_batch: int = 1000, workers: int = 1, **options) -> pathlib.Path:
    """Generates `num_examples` examples into `root` in the generator's layout, batch by batch; returns `root`.

    The files hold exactly `generate(num_examples, seed=seed, **options)`, however
    many `workers` (processes, one batch at a time each) make them.
    Raises FileExistsError when root/metadata already holds files.
    """
    num_examples = _check_int("num_examples", num_examples, 1)
    seed = _check_int("seed", seed, 0)
    images_per_batch = _check_int("images_per_batch", images_per_batch, 1)
    workers = _check_int("workers", workers, 1)
    opts = _options(options)
    root = pathlib.Path(root)
    _existing_metadata(root)
    begins = range(0, num_examples, images_per_batch)
    batches = (range(len(begins)), begins, [min(b + images_per_batch, num_examples) for b in begins])
    make, begin_time = functools.partial(_make_batch, root, seed, opts), time.perf_counter()
    # Spawned, not forked: a forked child of a process running JAX's threads can deadlock.
    spawn = multiprocessing.get_context("spawn")
    with (concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) if workers > 1
          else contextlib.nullcontext()) as pool:
        for done in (pool.map(make, *batches) if pool else map(make, *batches)):
            logger.info("%d/%d examples, %.1f s", done, num_examples, time.perf_counter() - begin_time)
    return root


def load(root: str | os.PathLike, *, skip_empty: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The splits 'train', 'validation', 'test' of a Pathfinder directory, as LRA cuts them.

    LRA takes the first 80% of the examples for training, the next 10% for
    validation and the last 10% for testing (percent boundaries rounded to the
    nearest example, as TFDS does). Each split is {"inputs": int32 [n, h * w],
    the pixel values + 1 row by row (0 is left for padding; VOCAB_SIZE = 257),
    "labels": int32 [n]}.
    Raises FileNotFoundError naming the command that generates a missing directory.
    """
    root = pathlib.Path(root)
    if not (root / "metadata").is_dir():
        raise FileNotFoundError(f"{root}: no Pathfinder data (root/metadata missing); generate it with: {_command(root)}")
    images, labels = read_directory(root, skip_empty=skip_empty)
    inputs = images.reshape(len(images), -1).astype(np.int32) + 1
    bounds = [0] + [int(round(end * len(images))) for end in _SPLIT_ENDS]
    return {split: {"inputs": inputs[begin:end], "labels": labels[begin:end]}
            for split, begin, end in zip(SPLITS, bounds, bounds[1:])}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: generates a Pathfinder directory (see `generate_files`) and says what it wrote."""
    parser = argparse.ArgumentParser(prog="python -m longjax.data.lra_pathfinder", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for imgs/ and metadata/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=200_000, help="how many images")
    parser.add_argument("--images-per-batch", type=int, default=1000, help="images per imgs/<batch> folder")
    parser.add_argument("--workers", type=int, default=1, help="processes generating batches in parallel")
    defaults = PathfinderOptions()
    for field in dataclasses.fields(PathfinderOptions):
        kind = float if field.name == "continuity" else int
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                            help=f"default {getattr(defaults, field.name)}")
    args = parser.parse_args(argv)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(PathfinderOptions)
               if getattr(args, f.name) is not None}
    begin = time.perf_counter()
    try:
        root = generate_files(args.out, seed=args.seed, num_examples=args.examples,
                              images_per_batch=args.images_per_batch, workers=args.workers, **options)
    except (ValueError, FileExistsError, RuntimeError) as e:
        parser.error(str(e))
    seconds = time.perf_counter() - begin
    print(f"{args.examples} examples -> {root} (seed {args.seed}, {seconds:.1f} s, "
          f"{1000 * seconds / args.examples:.2f} ms per example)", file=sys.stderr)


if __name__ == "__main__":
    main()
