"""Hinton's KD with RepDistiller's weights: 0.1 * CE + 0.9 * KL at T=4 (-r 0.1 -a 0.9 -b 0).

  kdjax distill --config experiments/cifar100/kd.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/kd-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    c = vanilla.distill_config(pair)
    c.loss.update(name="kd", ce_weight=0.1, kd_weight=0.9)
    c.loss.kwargs = {"temperature": 4.0}
    return c
