"""Decoupled KD (Zhao et al., 2022) with its paper's CIFAR-100 defaults: alpha 1, beta 8, T=4,
CE weight 1, the loss warmed up linearly over 20 epochs (the paper tunes beta per pair).

  kdjax distill --config experiments/cifar100/dkd.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/dkd-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    c = vanilla.distill_config(pair)
    c.loss.update(name="dkd", ce_weight=1.0, kd_weight=1.0,
                  kd_warmup_steps=20 * vanilla.STEPS_PER_EPOCH)
    c.loss.kwargs = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}
    return c
