"""Student LM trained alone (the baseline): lm_mini (2 layers, d_model 64, ~0.13M parameters,
6.5x fewer than the teacher), next-token cross-entropy, the same data as the teacher, for half the
teacher's steps (400 of batch 32 x 128 tokens: 1.6M tokens, a third of an epoch).

  kdjax train --config experiments/lm/student_scratch.py --workdir workdirs/lm/student_scratch
"""

import teacher  # the shared data, optimizer and prompts (kdjax.config.load puts this folder on the path)


def get_config():
    c = teacher.get_config()
    c.model.name = "lm_mini"
    c.train.steps = 400
    c.eval.every_steps = 400
    return c
