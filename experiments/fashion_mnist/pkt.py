"""Fashion-MNIST student: kd.py's loss (0.1 CE + 0.9 KD at T=4) plus probabilistic knowledge
transfer on the embeddings (RepDistiller's weight 30000).

  kdjax distill --config experiments/fashion_mnist/pkt.py --workdir workdirs/demo/student_pkt \
      --config.teacher.workdir=workdirs/demo/teacher
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.update(name="pkt", feature_weight=30000.0)
    c.loss.kwargs = {}
    return c
