"""The fair demo's setting (fair.py) with timm models through the PyTorch bridge: a timm teacher
and a timm student, both PyTorch-defined, trained and distilled in kdjax's fused step.

  kdjax train   --config experiments/fashion_mnist/timm_fair.py:teacher --workdir W/teacher
  kdjax train   --config experiments/fashion_mnist/timm_fair.py:scratch --workdir W/scratch
  kdjax distill --config experiments/fashion_mnist/timm_fair.py:kd --workdir W/kd \
      --config.teacher.workdir=W/teacher

Needs `pip install 'kdjax[torch]'`. The teacher is timm's `test_resnet` (373,370 parameters at
in_chans=1); the student timm's MLP-Mixer (`timm.models.mlp_mixer:MlpMixer`, 2 blocks of width 96
on 4x4 patches: 87,468 parameters, the fair demo's MLP's role), sized so that three seeds run on a
2-core CPU. fair.py's labels, transfer set, validation split, batch, optimizer and the students'
budget (fair.STUDENT_STEPS: 10 epochs of the transfer set, about 90 of the labelled images), the
same for both students. Each student's augmentation is the best of fair.py's grid on the
validation split, as benchmarks/fashion_mnist_timm.py chooses it.

An earlier student, timm's `test_efficientnet` (101,334 parameters) at 800 steps, scored within
a point of this teacher from scratch, and distillation did not beat its best scratch recipe
(benchmarks/results/fashion_mnist_timm_followup.md): a teacher barely better than its student
has little to give.
"""

import fair

TEACHER = {"model_name": "test_resnet", "in_chans": 1}
STUDENT_FACTORY = "timm.models.mlp_mixer:MlpMixer"
STUDENT = {"img_size": 28, "patch_size": 4, "num_blocks": 2, "embed_dim": 96,
           "mlp_ratio": [0.5, 2.0], "in_chans": 1, "num_classes": 10}
# Each student's augmentation as benchmarks/fashion_mnist_timm.py's validation sweep chose it
# (seed 0, validation split; benchmarks/results/fashion_mnist_timm.md): scratch none 83.93 %,
# flip 84.17 %, crop+flip 86.27 %; distilled none 87.30 %, flip 87.02 %, crop+flip 86.42 %.
CHOSEN = {"scratch": "crop+flip", "kd": "none"}


def get_config(role: str = "kd"):
    c = fair.get_config(role)
    if role == "teacher":
        c.model.torch, c.model.torch_kwargs = "timm:create_model", TEACHER
    else:
        c.model.torch, c.model.torch_kwargs = STUDENT_FACTORY, STUDENT
    if role in CHOSEN:
        c.data.update(fair.AUGMENTATION[CHOSEN[role]])
    return c
