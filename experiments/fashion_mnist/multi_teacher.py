"""Fashion-MNIST student distilled (kd.py's loss) from the ensemble of two teachers: the MLP
of teacher.py and the CNN of teacher_cnn.py (their averaged softened distributions).

  kdjax distill --config experiments/fashion_mnist/multi_teacher.py \
      --workdir workdirs/demo/student_multi_teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.teacher.update(workdir="", workdirs=("workdirs/demo/teacher", "workdirs/demo/teacher_cnn"),
                     combine="ensemble")
    return c
