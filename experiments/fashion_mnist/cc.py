"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus correlation congruence on 128-d
embedding heads (weight 1: kdjax's CC normalises its embeddings, see experiments/README.md).

  kdjax distill --config experiments/fashion_mnist/cc.py --workdir workdirs/demo/student_cc \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="cc", feature_weight=1.0)
    c.loss.kwargs = {}
    return c
