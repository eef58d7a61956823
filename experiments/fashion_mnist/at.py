"""Fashion-MNIST CNN student (cnn_tiny) taught by teacher_cnn.py's CNN: kd.py's loss
(0.1 CE + 0.9 KD at T=4) plus attention transfer on both stages (RepDistiller's weight 1000).

  kdjax distill --config experiments/fashion_mnist/at.py --workdir workdirs/demo/student_at \
      --config.teacher.workdir=workdirs/demo/teacher_cnn
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.model.name = "cnn_tiny"
    c.model.kwargs = {}
    c.teacher.workdir = "workdirs/demo/teacher_cnn"
    c.loss.update(name="at", feature_weight=1000.0)
    c.loss.kwargs = {}
    return c
