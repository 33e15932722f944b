"""`lra_listops`: LRA's ListOps, nested MAX/MIN/MED/SM expressions of up to 2,000 tokens, 10 classes.

The data is generated offline (no download) into LRA's own TSV files:

    python -m longjax.data.lra_listops --out=$LONGJAX_DATA_DIR/lra_listops

(96K/2K/2K examples, depth 10, up to 10 arguments, 500-2,000 tokens, seeded;
see `longjax.data.lra_listops`). LRA's released files read the same way.
Configs: `configs/lra_listops.py:<attention>`. See `longjax.tasks.lra_base`.
"""

from __future__ import annotations

from longjax.data import lra_listops
from longjax.tasks import lra_base


class ListOpsTask(lra_base.LRATask):
    directory_name = "lra_listops"
    vocab_size = lra_listops.VOCAB_SIZE
    num_labels = lra_listops.NUM_LABELS

    def read_tables(self, section, directory, seq_len):
        return lra_listops.load(directory, seq_len)


TASK = ListOpsTask()
