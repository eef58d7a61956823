"""Fashion-MNIST student distilled with decoupled KD (alpha 1, beta 8, T=4) instead of kd.py's KD.

  kdjax distill --config experiments/fashion_mnist/dkd.py --workdir workdirs/demo/student_dkd \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.name = "dkd"
    c.loss.kwargs = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}
    return c
