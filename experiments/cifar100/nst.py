"""Neuron selectivity transfer on every stage (-a 0 -b 50).

  kdjax distill --config experiments/cifar100/nst.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/nst-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "nst", 50.0)
