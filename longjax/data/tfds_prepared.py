"""Datasets prepared by tensorflow-datasets, read without TensorFlow (and without a download).

tfds' data sources (`builder.as_data_source(split)`) give random access to a
dataset prepared in the `array_record` or `parquet` file format with NumPy
only; `tfrecord` needs TensorFlow. IMDB (`longjax.data.text_classification`)
and CIFAR-10 (`longjax.data.lra_files`) are read this way.
"""

from __future__ import annotations

import os


def builder(name: str, data_dir: str | os.PathLike):
    """The tfds builder of `name` prepared in `data_dir`, in a format its data sources read.

    Raises:
      FileNotFoundError naming `data_dir` if `name` is not prepared there, with the command that prepares it.
      ValueError if it is prepared as tfrecord (or another format without random access), with the command.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    build = f"`tfds build {name} --data_dir={data_dir} --file_format=array_record` on a machine with network"
    prepared = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not prepared.is_prepared():
        raise FileNotFoundError(f"{data_dir}: {name} is not prepared in this tfds data_dir; prepare it with {build}")
    file_format = prepared.info.file_format
    if file_format not in (tfds.core.FileFormat.ARRAY_RECORD, tfds.core.FileFormat.PARQUET):
        raise ValueError(
            f"{data_dir}: {name} is prepared as {file_format.value}, which tfds cannot read without TensorFlow; "
            f"rebuild it with {build}"
        )
    return prepared
