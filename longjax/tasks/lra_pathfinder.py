"""`lra_pathfinder`: LRA's Pathfinder, are two dots on one contour? 32 x 32 pixels as a sequence of 1,024.

The images are generated offline (no download) in the original generator's
layout (`imgs/<batch>/sample_<i>.png` and `metadata/<batch>.npy`):

    python -m longjax.data.lra_pathfinder --out=$LONGJAX_DATA_DIR/lra_pathfinder

(contour length 14, paddle length 2, distractor snakes, seeded; see
`longjax.data.lra_pathfinder`). Configs: `configs/lra_pathfinder.py:<attention>`.
See `longjax.tasks.lra_base`.
"""

from __future__ import annotations

from longjax.data import lra_pathfinder
from longjax.tasks import lra_base


class PathfinderTask(lra_base.LRATask):
    directory_name = "lra_pathfinder"
    vocab_size = lra_pathfinder.VOCAB_SIZE
    num_labels = lra_pathfinder.NUM_LABELS
    fixed_length = 32 * 32

    def read_tables(self, section, directory, seq_len):
        return lra_pathfinder.load(directory)


TASK = PathfinderTask()
