"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus VID between the student's
hidden layer and the teacher's second (weight 1).

  kdjax distill --config experiments/fashion_mnist/vid.py --workdir workdirs/demo/student_vid \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="vid", feature_weight=1.0, student_taps=("hidden1",),
                  teacher_taps=("hidden2",))
    c.loss.kwargs = {}
    return c
