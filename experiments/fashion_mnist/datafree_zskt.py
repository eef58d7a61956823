"""Data-free distillation with zero-shot knowledge transfer (Micaelli & Storkey, NeurIPS 2019):
kd.py's MLP student and a generator play a game against each other, with teacher_cnn.py's
BatchNorm CNN (cnn_small) as the judge; the student never sees a real image in training.

  kdjax distill --config experiments/fashion_mnist/datafree_zskt.py \
      --workdir workdirs/datafree/zskt --config.teacher.workdir=workdirs/demo/teacher_cnn

Each round the generator takes one Adam step to maximise KL(teacher || student) on its images
(plus, here, DeepInversion's BatchNorm-statistics prior with weight 1: bn_weight=0 is pure
ZSKT), then the student takes 5 steps to minimise it on fresh ones, all in one compiled call;
2340 student steps as student_scratch.py's budget (468 rounds). Evaluation is on the test split.
"""

import student_scratch  # the shared student recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = student_scratch.get_config()
    c.datafree.method = "zskt"
    c.datafree.latent_dim = 100
    c.datafree.generator_channels = (32, 16)  # CPU-sized; wider on accelerators
    c.datafree.generator_lr = 1e-3
    c.datafree.student_steps = 5
    c.datafree.bn_weight = 1.0
    c.datafree.balance_weight = 0.0
    c.train.steps = 2340
    c.loss.name = "kd"
    c.loss.kwargs = {"temperature": 1.0}
    c.teacher.workdir = "workdirs/demo/teacher_cnn"
    return c
