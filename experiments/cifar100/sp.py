"""Similarity-preserving KD on the last stage (-a 0 -b 3000).

  kdjax distill --config experiments/cifar100/sp.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/sp-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "sp", 3000.0)
