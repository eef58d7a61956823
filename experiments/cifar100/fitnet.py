"""FitNets' hint on the second stage through RepDistiller's ConvReg (-a 0 -b 100).

  kdjax distill --config experiments/cifar100/fitnet.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/fitnet-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    return vanilla.repdistiller(pair, "fitnet", 100.0)
