"""Tf-KD with the virtual teacher (Tf-KD_reg, Yuan et al., CVPR 2020): no teacher is trained or
loaded; the student learns from the labels and from a hand-designed distribution, 0.99 on the
labelled class and the rest spread uniformly, both softened at T=20.

  kdjax distill --config experiments/fashion_mnist/tfkd_virtual.py \
      --workdir workdirs/demo/student_tfkd_virtual

Loss: 0.9 CE + 0.1 T^2 KL(p^d_T || p_T) (the paper's alpha=0.1, a=0.99, T=20 for ResNet-18 on
CIFAR-100; kdjax.losses.teacher_free_kd documents how it differs from the authors' code).
"""

import student_scratch  # the shared student recipe (kdjax.config.load puts this folder on the path)


def get_config():
    c = student_scratch.get_config()
    c.loss.update(name="tfkd", ce_weight=0.9, kd_weight=0.1)
    c.loss.kwargs = {"variant": "virtual", "correct_prob": 0.99, "temperature": 20.0}
    return c
