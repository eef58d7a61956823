"""Student LM distilled on its own samples half of the time (on-policy distillation, GKD-style):
distill.py's student, teacher and steps; with probability lm.on_policy.fraction = 0.5 a step's
batch is the first 64 tokens of each corpus row continued by 64 tokens that the student samples
(temperature 1) with that step's weights inside the fused step, and it is trained on the
generated tokens by the generalized JSD (beta 0.5) against the teacher, no CE; the other
batches are distill.py's supervised distillation with the same divergence.

  kdjax distill --config experiments/lm/onpolicy.py --workdir workdirs/lm/student_onpolicy \
      --config.teacher.workdir=workdirs/lm/teacher

fraction=1: every batch generated; generator=teacher: sequence-level KD (the teacher's own
continuations, learnt by CE and the divergence); fraction=0: distill.py with this divergence.
"""

import distill


def get_config():
    c = distill.get_config()
    c.loss.name = "jsd"
    c.loss.kwargs = {"beta": 0.5}
    c.lm.on_policy = dict(fraction=0.5, generator="student", prompt_tokens=64,
                          max_new_tokens=64, temperature=1.0)
    return c
