"""Correlation congruence on 128-d embedding heads (-a 0 -b 0.02).

kdjax's CC is the paper's loss with a linear kernel on L2-normalised embeddings, not RepDistiller's
implementation, so beta=0.02 (RepDistiller's) is not tuned for it; see experiments/README.md.

  kdjax distill --config experiments/cifar100/cc.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/cc-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "cc", 0.02)
