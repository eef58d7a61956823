"""(a) Distil, then prune the distilled student, fine-tuning it with distillation.

  kdjax distill --config experiments/fashion_mnist/kd.py --workdir workdirs/demo/student_kd \
      --config.teacher.workdir=workdirs/demo/teacher
  kdjax distill --config experiments/fashion_mnist/compress_prune_after.py:magnitude-0.9 \
      --workdir workdirs/compress/kd_magnitude_90
  kdjax export --workdir workdirs/compress/kd_magnitude_90 --out exports/kd_magnitude_90

`FILE.py:METHOD-SPARSITY`: METHOD is magnitude (unstructured) or structured (whole hidden
neurons, removed on export: the exported MLP is 784-13-10 at 0.9); SPARSITY in [0, 1). The
student starts from kd.py's distilled student (init.workdir), is pruned on Zhu & Gupta's cubic
schedule over the first half of one epoch, and fine-tuned with kd.py's loss for the rest. The
label-only baseline at the same cost is the same run with plain cross-entropy:

  kdjax train --config experiments/fashion_mnist/compress_prune_after.py:magnitude-0.9 \
      --workdir workdirs/compress/ce_magnitude_90 --config.loss.name=ce --config.loss.kwargs={}

The 784-128-10 student's first layer holds 99% of its weights, so unlike the library default
(prune.dense_first_last) it is pruned here; the classifier (1,290 weights) stays dense.
"""

import kd


def get_config(arg: str = "magnitude-0.9"):
    method, _, sparsity = arg.partition("-")
    c = kd.get_config()
    c.init.workdir = "workdirs/demo/student_kd"
    c.train.steps = 468  # one epoch of fine-tuning
    c.eval.every_steps = 468
    c.checkpoint.every_steps = 468
    c.optimizer.learning_rate = 0.01  # fine-tuning a trained student
    c.prune.method = method
    c.prune.sparsity = float(sparsity)
    c.prune.criterion = "l1"  # an MLP has no BatchNorm scales to rank neurons by
    c.prune.schedule = "cubic"
    c.prune.begin_step = 0
    c.prune.end_step = 234
    c.prune.every_steps = 26
    c.prune.dense_first_last = False
    # The classifier stays dense (structured pruning never removes classes: nothing to exclude).
    c.prune.exclude = ("out",) if method != "structured" else ()
    return c
