"""Deep mutual learning (Zhang et al., 2018): the pair's student and a peer of the same
architecture train together from the labels and each other (T=1); no teacher.

  kdjax distill --config experiments/cifar100/dml.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/dml-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    c = vanilla.distill_config(pair)
    c.teacher.workdir = ""
    c.model.peers = (c.model.name,)
    c.loss.update(name="dml", ce_weight=1.0, kd_weight=1.0)
    c.loss.kwargs = {"temperature": 1.0}
    return c
