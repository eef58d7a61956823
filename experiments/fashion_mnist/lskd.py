"""Fashion-MNIST student distilled with logit-standardized KD (T=2) instead of kd.py's KD.

  kdjax distill --config experiments/fashion_mnist/lskd.py --workdir workdirs/demo/student_lskd \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.name = "lskd"
    c.loss.kwargs = {"temperature": 2.0}
    return c
