"""`lra_text`: LRA's Text, byte-level IMDB sentiment, reviews cut at 4K bytes, 2 classes.

Reads `imdb_reviews` prepared by tensorflow-datasets (array_record or parquet)
in `data.dir`; IMDB has no validation split, so `data.validation_fraction` of
the training reviews (by id) is held out for it (LRA itself evaluates on test).
Configs: `configs/lra_text.py:<attention>`. See `longjax.tasks.lra_base` and
`longjax.data.lra_files`.
"""

from __future__ import annotations

from longjax.data import lra_files
from longjax.tasks import lra_base


class TextTask(lra_base.LRATask):
    directory_name = "tensorflow_datasets"
    vocab_size = lra_files.TEXT_VOCAB_SIZE
    num_labels = lra_files.TEXT_NUM_LABELS

    def read_tables(self, section, directory, seq_len):
        return lra_files.load_text(directory, seq_len=seq_len, validation_fraction=section.validation_fraction)


TASK = TextTask()
