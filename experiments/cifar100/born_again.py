"""Born-again networks (Furlanello et al., 2018) of the pair's student architecture: generation 1
distils from a vanilla run of that same architecture with kd.py's loss, each later generation
from the previous one.

  kdjax distill --config experiments/cifar100/born_again.py:resnet32x4-resnet8x4 \
      --workdir workdirs/cifar100/born_again-resnet8x4 --generations 3

expects the vanilla student in workdirs/cifar100/<student> (vanilla.py:<student>).
"""

import kd
import vanilla


def get_config(pair: str = vanilla.DEFAULT_PAIR):
    c = kd.get_config(pair)
    c.teacher.workdir = f"workdirs/cifar100/{c.model.name}"
    return c
