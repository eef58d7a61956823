"""Relational KD on the pooled embeddings, distance 25 and angle 50 (-a 0 -b 1).

  kdjax distill --config experiments/cifar100/rkd.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/rkd-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "rkd", 1.0)
