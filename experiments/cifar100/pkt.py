"""Probabilistic knowledge transfer on the pooled embeddings (-a 0 -b 30000).

  kdjax distill --config experiments/cifar100/pkt.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/pkt-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "pkt", 30000.0)
