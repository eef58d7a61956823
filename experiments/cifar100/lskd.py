"""KD on z-scored logits (Sun et al., 2024) in place of kd.py's KD: 0.1 * CE + 0.9 * KL at T=2
(the recipe's weights are KD's; the paper tunes them per pair).

  kdjax distill --config experiments/cifar100/lskd.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/lskd-resnet32x4-resnet8x4
"""

import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    c = vanilla.distill_config(pair)
    c.loss.update(name="lskd", ce_weight=0.1, kd_weight=0.9)
    c.loss.kwargs = {"temperature": 2.0}
    return c
