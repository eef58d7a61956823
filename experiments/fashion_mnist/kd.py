"""Fashion-MNIST student distilled from the teacher with Hinton's soft targets (T=4, alpha=0.9).

  kdjax distill --config experiments/fashion_mnist/kd.py --workdir workdirs/demo/student_kd \
      --config.teacher.workdir=workdirs/demo/teacher

The student, data, steps and optimizer are student_scratch.py's; the loss is
0.1 * CE(labels) + 0.9 * T^2 KL(p_teacher || p_student) at T=4 (kdjax.losses.hinton_kd's mix).
"""

import student_scratch  # the shared student recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = student_scratch.get_config()
    c.loss.name = "kd"
    c.loss.kwargs = {"temperature": 4.0}
    c.loss.ce_weight = 0.1
    c.loss.kd_weight = 0.9
    c.teacher.workdir = "workdirs/demo/teacher"
    return c
