"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus FitNets' hint (RepDistiller's
weight 100) between the student's hidden layer and the teacher's second, through a linear
regressor.

  kdjax distill --config experiments/fashion_mnist/fitnet.py \
      --workdir workdirs/demo/student_fitnet \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="fitnet", feature_weight=100.0)
    c.loss.kwargs = {}
    return c
