"""`lra_text`: LRA's Text, byte-level IMDB sentiment, reviews cut at 4K bytes, 2 classes.

Reads `imdb_reviews` prepared by tensorflow-datasets (array_record or parquet)
in `data.dir`; IMDB has no validation split, so `data.validation_fraction` of
the training reviews (by id) is held out for it (LRA itself evaluates on test).
Configs: `configs/lra_text.py:<attention>`. See `longjax.tasks.lra_base` and
`longjax.data.lra_files`.
"""

from __future__ import annotations

import dataclasses

from longjax import sections
from longjax.data import lra_files
from longjax.tasks import lra_base


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection(lra_base.DataSection):
    """`config.data` of lra_text: the tfds data directory, and the training reviews held out for validation."""

    validation_fraction: float = 0.1

    def __post_init__(self):
        sections.require(0 < self.validation_fraction < 1, "data.validation_fraction", self.validation_fraction,
                         "in (0, 1)")


class TextTask(lra_base.LRATask):
    data_section = DataSection
    directory_name = "tensorflow_datasets"
    vocab_size = lra_files.TEXT_VOCAB_SIZE
    num_labels = lra_files.TEXT_NUM_LABELS

    def read_tables(self, section, directory, seq_len):
        return lra_files.load_text(directory, seq_len=seq_len, validation_fraction=section.validation_fraction)


TASK = TextTask()
