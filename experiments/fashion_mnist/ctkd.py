"""kd.py with CTKD's learned temperature (Li et al., AAAI 2023): one global temperature
T = 1 + 20 * sigmoid(z), starting at kd.py's T=4, trained adversarially (to maximise the KD loss)
through a gradient-reversal layer whose strength rises from 0 to 1 along a cosine over the first
1/24 of training (the paper: 10 of 240 epochs), in the same step as the student.

  kdjax distill --config experiments/fashion_mnist/ctkd.py \
      --workdir workdirs/demo/student_ctkd --config.teacher.workdir=workdirs/demo/teacher

The learned temperature is logged as train/temperature (and the reversal's strength as
train/temperature_strength); mode="instance" predicts one per example from both models' logits.
The temperature module trains with the student, is checkpointed with it and is not exported.
"""

import kd  # the shared distillation recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = kd.get_config()
    c.loss.learned_temperature.update(mode="global", t_min=1.0, t_range=20.0, max_strength=1.0,
                                      curriculum_steps=c.train.steps // 24)
    return c
