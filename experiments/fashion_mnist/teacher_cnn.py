"""Fashion-MNIST CNN teacher (cnn_small) for the methods that compare feature maps (at.py, nst.py).

  kdjax train --config experiments/fashion_mnist/teacher_cnn.py --workdir workdirs/demo/teacher_cnn

Same data, steps and optimizer as teacher.py; convolutions are slow on CPU (see teacher.py).
"""

import teacher


def get_config():
    c = teacher.get_config()
    c.model.name = "cnn_small"
    return c
