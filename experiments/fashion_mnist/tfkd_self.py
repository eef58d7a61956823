"""Tf-KD with a self-teacher (Yuan et al., CVPR 2020): the student distilled from a trained copy
of itself, the run of student_scratch.py. Train that run first, then point teacher.workdir at it:

  kdjax train --config experiments/fashion_mnist/student_scratch.py \
      --workdir workdirs/demo/student_scratch
  kdjax distill --config experiments/fashion_mnist/tfkd_self.py \
      --workdir workdirs/demo/student_tfkd_self \
      --config.teacher.workdir=workdirs/demo/student_scratch

Any run of the student's architecture (model.name and model.kwargs) can be the teacher; `kdjax
distill` refuses another architecture (that is plain kd.py). The loss is Hinton's KD at the
paper's self-training settings for ResNet-18 on CIFAR-100: T=6, alpha=0.95 (0.05 CE + 0.95 KD,
kdjax's T^2-scaled batch-mean KL; the authors' `multiplier` compensates their class-mean KL).
"""

import student_scratch  # the shared student recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = student_scratch.get_config()
    c.loss.update(name="tfkd", ce_weight=0.05, kd_weight=0.95)
    c.loss.kwargs = {"variant": "self", "temperature": 6.0}
    c.teacher.workdir = "workdirs/demo/student_scratch"
    return c
