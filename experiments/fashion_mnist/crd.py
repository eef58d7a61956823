"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus CRD on the embeddings
(RepDistiller's weight 0.8), with 256 negatives drawn with replacement: the paper's 16384, drawn
without replacement, make each step score and sort all 60k examples, slow on CPU.

  kdjax distill --config experiments/fashion_mnist/crd.py --workdir workdirs/demo/student_crd \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="crd", feature_weight=0.8)
    c.loss.kwargs = {"num_negatives": 256, "replacement": True}
    return c
