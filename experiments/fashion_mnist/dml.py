"""Deep mutual learning on Fashion-MNIST: kd.py's student and a peer of the same architecture
learn from the labels and from each other (T=1); no teacher.

  kdjax distill --config experiments/fashion_mnist/dml.py --workdir workdirs/demo/student_dml
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.teacher.workdir = ""
    c.model.peers = (c.model.name,)
    c.loss.update(name="dml", ce_weight=1.0, kd_weight=1.0)
    c.loss.kwargs = {"temperature": 1.0}
    return c
