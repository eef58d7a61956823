"""Fashion-MNIST CNN student: kd_cnn.py's loss (0.1 CE + 0.9 KD at T=4, from teacher_cnn.py's
CNN) plus neuron selectivity transfer on both stages (RepDistiller's weight 50).

  kdjax distill --config experiments/fashion_mnist/nst.py --workdir workdirs/demo/student_nst \
      --config.teacher.workdir=workdirs/demo/teacher_cnn
"""

import kd_cnn  # the CNN pair (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd_cnn.get_config()
    c.loss.update(name="nst", feature_weight=50.0)
    c.loss.kwargs = {}
    return c
