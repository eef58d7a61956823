"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus CRD on the embeddings (weight
0.8; 4096 negatives rather than the paper's 16384, which are slow to draw on CPU).

  kdjax distill --config experiments/fashion_mnist/crd.py --workdir workdirs/demo/student_crd \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="crd", kwargs={"num_negatives": 4096}, feature_weight=0.8)
    return c
