"""Contrastive representation distillation (-a 0 -b 0.8): 128-d heads, 16384 negatives,
T=0.07, memory momentum 0.5.

  kdjax distill --config experiments/cifar100/crd.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/crd-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "crd", 0.8)
