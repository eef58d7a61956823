"""Student LM distilled from the teacher: student_scratch.py's model, data, steps and optimizer,
with the loss 0.5 * CE(next token) + 0.5 * T^2 KL(p_teacher || p_student) per target token
(forward KL at T = 1), computed in vocabulary chunks (lm.chunk_size) inside the fused step.

  kdjax distill --config experiments/lm/distill.py --workdir workdirs/lm/student_kd \
      --config.teacher.workdir=workdirs/lm/teacher

Any token divergence is one override away: --config.loss.name=jsd --config.loss.kwargs="{'beta':
0.5}", reverse_kl, skew_kl ({'alpha': 0.1}), skew_reverse_kl, tvd.
"""

import student_scratch


def get_config():
    c = student_scratch.get_config()
    c.loss.name = "forward_kl"
    c.loss.kwargs = {"temperature": 1.0}
    c.loss.ce_weight = 0.5
    c.loss.kd_weight = 0.5
    c.teacher.workdir = "workdirs/lm/teacher"
    c.checkpoint.best_metric = "eval/loss"
    return c
