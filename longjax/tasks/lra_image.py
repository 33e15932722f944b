"""`lra_image`: LRA's Image, CIFAR-10 in 8-bit grayscale as a sequence of 1,024 pixels, 10 classes.

Reads `cifar10` prepared by tensorflow-datasets (array_record or parquet) in
`data.dir`; LRA's splits: the first 90% of train, the last 10% as
validation, test. Configs: `configs/lra_image.py:<attention>`. See
`longjax.tasks.lra_base` and `longjax.data.lra_files`.
"""

from __future__ import annotations

from longjax.data import lra_files
from longjax.tasks import lra_base


class ImageTask(lra_base.LRATask):
    directory_name = "tensorflow_datasets"
    vocab_size = lra_files.IMAGE_VOCAB_SIZE
    num_labels = lra_files.IMAGE_NUM_LABELS
    fixed_length = 32 * 32

    def read_tables(self, section, directory, seq_len):
        return lra_files.load_image(directory)


TASK = ImageTask()
