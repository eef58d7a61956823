"""(b) Prune while distilling: the student is distilled from scratch and pruned on the way.

  kdjax distill --config experiments/fashion_mnist/compress_prune_during.py:magnitude-0.9 \
      --workdir workdirs/compress/during_magnitude_90 --config.teacher.workdir=workdirs/demo/teacher

kd.py's recipe (its steps, loss and teacher) with the cubic schedule from 10% to 60% of the run
(Zhu & Gupta prune while the network is still learning, and leave the last steps to recover).
`FILE.py:METHOD-SPARSITY` as in compress_prune_after.py.
"""

import compress_prune_after
import kd


def get_config(arg: str = "magnitude-0.9"):
    c = kd.get_config()
    c.prune = compress_prune_after.get_config(arg).prune
    c.prune.begin_step = c.train.steps // 10
    c.prune.end_step = c.train.steps * 6 // 10
    c.prune.every_steps = max(1, c.train.steps // 50)
    return c
