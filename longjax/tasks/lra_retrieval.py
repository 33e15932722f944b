"""`lra_retrieval`: LRA's Retrieval, do two ACL Anthology papers cite each other? Byte-level, 4K bytes each.

Reads LRA's AAN pair files (`new_aan_pairs.{train,eval,test}.tsv`) in
`data.dir`; one encoder reads both documents and the classifier sees
`[u, v, u * v, u - v]` of their pooled vectors (`model.pair`).
Configs: `configs/lra_retrieval.py:<attention>`. See `longjax.tasks.lra_base`
and `longjax.data.lra_files`.
"""

from __future__ import annotations

from longjax.data import lra_files
from longjax.tasks import lra_base


class RetrievalTask(lra_base.LRATask):
    directory_name = "lra_retrieval"
    vocab_size = lra_files.RETRIEVAL_VOCAB_SIZE
    num_labels = lra_files.RETRIEVAL_NUM_LABELS
    pair = True

    def read_tables(self, section, directory, seq_len):
        return lra_files.load_retrieval(directory, seq_len=seq_len)


TASK = RetrievalTask()
