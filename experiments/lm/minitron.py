"""Prune the teacher LM into the student (Minitron), then distil from the unpruned teacher.

  kdjax distill --config experiments/lm/minitron.py --workdir workdirs/lm/minitron \
      --config.init.workdir=workdirs/lm/teacher --config.teacher.workdir=workdirs/lm/teacher

Before the first step the teacher's lm_small (4 blocks, d_model 128, 4 query heads in 2 KV groups
of width 32, d_ff 384) loses half its residual width, half its FFN neurons, one of its two KV
groups and half its blocks, ranked by Minitron's activation importance and ShortGPT's Block
Influence on 64 training rows (kdjax.compress.minitron): 2 blocks, d_model 64, 2 heads of 32,
d_ff 192, about lm_mini's size. distill.py's loss and steps then recover what pruning lost;
student_scratch.py with model.kwargs of the pruned shape is its baseline.
"""

import distill  # its loss, data, optimizer, steps (kdjax.config.load puts this folder on the path)

#: The pruned shape, also what a from-scratch baseline of the same shape builds (model.kwargs).
SHAPE = dict(d_model=64, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=192, head_dim=32)


def get_config():
    c = distill.get_config()
    c.model.name = "lm_small"  # the teacher's architecture, which init.workdir's run records
    c.model.kwargs = {}
    c.init.workdir = "workdirs/lm/teacher"
    c.prune.method = "minitron"
    c.prune.schedule = "init"
    c.prune.minitron = dict(d_model=SHAPE["d_model"], d_ff=SHAPE["d_ff"],
                            num_heads=SHAPE["num_heads"], num_layers=SHAPE["num_layers"],
                            calibration_rows=64)
    return c
