"""Variational information distillation on every stage (-a 0 -b 1).

  kdjax distill --config experiments/cifar100/vid.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/vid-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "vid", 1.0)
