"""Fashion-MNIST CNN student (cnn_tiny) taught by teacher_cnn.py's CNN: kd.py's loss
(0.1 CE + 0.9 KD at T=4) plus neuron selectivity transfer on both stages (RepDistiller's weight 50).

  kdjax distill --config experiments/fashion_mnist/nst.py --workdir workdirs/demo/student_nst \
      --config.teacher.workdir=workdirs/demo/teacher_cnn
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.model.name = "cnn_tiny"
    c.model.kwargs = {}
    c.teacher.workdir = "workdirs/demo/teacher_cnn"
    c.loss.update(name="nst", feature_weight=50.0)
    c.loss.kwargs = {}
    return c
