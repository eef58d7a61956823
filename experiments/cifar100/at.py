"""Attention transfer on every stage (-a 0 -b 1000).

  kdjax distill --config experiments/cifar100/at.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/at-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "at", 1000.0)
