"""Fashion-MNIST CNN student: kd_cnn.py's loss (0.1 CE + 0.9 KD at T=4, from teacher_cnn.py's
CNN) plus attention transfer on both stages (RepDistiller's weight 1000).

  kdjax distill --config experiments/fashion_mnist/at.py --workdir workdirs/demo/student_at \
      --config.teacher.workdir=workdirs/demo/teacher_cnn
"""

import kd_cnn  # the CNN pair (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd_cnn.get_config()
    c.loss.update(name="at", feature_weight=1000.0)
    c.loss.kwargs = {}
    return c
