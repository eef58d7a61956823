"""Born-again networks on Fashion-MNIST: students of the teacher's own architecture (784-1200-1200),
each generation distilled with kd.py's loss from the previous one; run with --generations N.

  kdjax distill --config experiments/fashion_mnist/born_again.py \
      --workdir workdirs/demo/born_again \
      --config.teacher.workdir=workdirs/demo/teacher --generations 3
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.model.name = "mlp_1200"
    c.model.kwargs = {}
    return c
