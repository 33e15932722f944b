"""Where tests/fixtures/make_hf_fixtures.py wrote the tiny Hugging Face checkpoints, and how to read their outputs."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np

HF = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
PAD = 1
# transformers' float32 outputs against longjax's: the issue's bound.
ATOL = 1e-5


def recorded(name: str) -> dict[str, np.ndarray]:
    """The inputs and Hugging Face outputs recorded beside checkpoint `name` (e.g. 'longformer_mlm/no_global')."""
    with np.load(HF / name / "outputs.npz") as z:
        return {k: z[k] for k in z.files}


def inputs_of(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: outputs[k] for k in ("input_ids", "attention_mask", "global_attention_mask") if k in outputs}


def copy_checkpoint(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """A writable copy of checkpoint `name` (files only, not subdirectories)."""
    out = tmp_path / name
    out.mkdir(parents=True)
    for f in (HF / name).iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out
