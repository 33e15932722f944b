"""The weight files of a Hugging Face checkpoint directory: which to read, and how they are sharded."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from longjax.hf.safetensors_io import read_safetensors, write_safetensors
from longjax.hf.torch_pickle import read_torch_state_dict

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# transformers' preference when a directory holds several.
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
# What a checkpoint's tokenizer may consist of; copied along when a checkpoint is converted or saved.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)


def _read_one(path: pathlib.Path) -> dict[str, np.ndarray]:
    if path.name.endswith(".safetensors"):
        return read_safetensors(path)[0]
    return read_torch_state_dict(path)


def read_checkpoint_tensors(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], pathlib.Path]:
    """Every weight of a checkpoint directory, as its PyTorch names and NumPy arrays.

    Reads the first of `model.safetensors`, `model.safetensors.index.json`
    (shards), `pytorch_model.bin`, `pytorch_model.bin.index.json` that exists.

    Returns:
      `(tensors, source)`: name -> array and the file read (the index for shards).

    Raises:
      FileNotFoundError naming the directory and the files looked for, or a
      shard an index names; ValueError for an index whose shards do not hold
      the weights it lists.
    """
    directory = pathlib.Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_one(path), path
        index = json.loads(path.read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path}: expected a 'weight_map' object mapping weight names to shard files")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{path} names shard {shard!r}, which is not in {directory}")
            tensors.update(_read_one(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"{path}: weights {missing[:5]} are listed but not in their shards")
        return {name: tensors[name] for name in weight_map}, path
    raise FileNotFoundError(f"{directory}: no weights file; expected one of {list(WEIGHT_FILES)}")


def replace_checkpoint_tensors(
    directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, max_shard_bytes: int | None = None
) -> list[pathlib.Path]:
    """`write_checkpoint_tensors` after removing any weight files (and stale shards) already in `directory`."""
    directory = pathlib.Path(directory)
    for name in WEIGHT_FILES:
        (directory / name).unlink(missing_ok=True)
    for stale in directory.glob("model-*-of-*.safetensors"):
        stale.unlink()
    return write_checkpoint_tensors(directory, tensors, max_shard_bytes=max_shard_bytes)


def write_checkpoint_tensors(
    directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, max_shard_bytes: int | None = None
) -> list[pathlib.Path]:
    """Writes weights as `model.safetensors`, or as shards plus an index when they exceed `max_shard_bytes`.

    The shard names and index (`model-00001-of-00003.safetensors`,
    `model.safetensors.index.json` with `metadata.total_size` and
    `weight_map`) are Hugging Face's, so transformers loads the directory.

    Returns:
      The files written.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    sizes = {name: np.asarray(t).nbytes for name, t in tensors.items()}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        write_safetensors(directory / SAFETENSORS, tensors, metadata)
        return [directory / SAFETENSORS]
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(tensors):
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    written, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / filename, {n: tensors[n] for n in names}, metadata)
        weight_map.update({n: filename for n in names})
        written.append(directory / filename)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return written + [directory / SAFETENSORS_INDEX]
