"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus relational KD on the
embeddings (weight 1). Its angle term compares all B^3 triplets of both embeddings (the
teacher's 1200-d ones in their 128-d span): on 2 CPU cores the slowest method here.

  kdjax distill --config experiments/fashion_mnist/rkd.py --workdir workdirs/demo/student_rkd \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="rkd", feature_weight=1.0)
    c.loss.kwargs = {}
    return c
