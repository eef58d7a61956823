"""kd.py on the CNN pair: a cnn_tiny student taught by teacher_cnn.py's cnn_small, for the
methods that compare feature maps (at.py, nst.py) and as their KD baseline.

  kdjax distill --config experiments/fashion_mnist/kd_cnn.py \
      --workdir workdirs/demo/student_kd_cnn --config.teacher.workdir=workdirs/demo/teacher_cnn
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.model.name = "cnn_tiny"
    c.model.kwargs = {}
    c.teacher.workdir = "workdirs/demo/teacher_cnn"
    return c
