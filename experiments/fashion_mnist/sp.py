"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus similarity-preserving KD on the
last hidden layers (RepDistiller's weight 3000).

  kdjax distill --config experiments/fashion_mnist/sp.py --workdir workdirs/demo/student_sp \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="sp", feature_weight=3000.0)
    c.loss.kwargs = {}
    return c
