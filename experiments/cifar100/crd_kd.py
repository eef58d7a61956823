"""CRD combined with KD (-a 1 -b 0.8), the paper's CRD+KD.

  kdjax distill --config experiments/cifar100/crd_kd.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/crd_kd-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    c = vanilla.repdistiller(pair, "crd", 0.8)
    c.loss.kd_weight = 1.0  # Hinton KD at loss.kd_temperature=4
    return c
