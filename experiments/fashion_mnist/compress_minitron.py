"""(d) Prune the teacher into the student (Minitron): the trained teacher, its neurons pruned by
L1 norm and removed, is the student's architecture and initial weights; distillation from the
unpruned teacher recovers the accuracy.

  kdjax distill --config experiments/fashion_mnist/compress_minitron.py \
      --workdir workdirs/compress/minitron --config.teacher.workdir=workdirs/demo/teacher \
      --config.init.workdir=workdirs/demo/teacher

At prune.sparsity=0.9 teacher.py's 784-1200-1200-10 MLP becomes 784-120-120-10 (110k weights,
the size of kd.py's 784-128-10 student, 102k) before the first step; the run distils it for one
epoch with kd.py's loss. Its checkpoints record the smaller architecture (model.kwargs hidden).
"""

import kd


def get_config():
    c = kd.get_config()
    c.model.name = "mlp_1200"  # the teacher's architecture, which init.workdir's run records
    c.model.kwargs = {}
    c.init.workdir = "workdirs/demo/teacher"
    c.prune.method = "structured"
    c.prune.schedule = "init"
    c.prune.criterion = "l1"
    c.prune.sparsity = 0.9
    c.train.steps = 468
    c.eval.every_steps = c.checkpoint.every_steps = 468
    c.optimizer.learning_rate = 0.02
    return c
