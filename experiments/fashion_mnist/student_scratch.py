"""Fashion-MNIST student trained from the labels alone: the baseline distillation must beat.

  kdjax train --config experiments/fashion_mnist/student_scratch.py --workdir workdirs/demo/student_scratch

`student_scratch.py:MODEL` trains another registry model (its default size) on the same recipe:
the baseline of the distilled students of that architecture (cnn_tiny for kd_cnn.py, at.py and
nst.py; mlp_1200 for born_again.py).

Same model, data, augmentation, steps and optimizer as kd.py; only the loss differs. Both see
randomly cropped (2 px) and flipped images: the distilled student gets the teacher's soft labels
for each augmented view (consistent teaching, Beyer et al. 2022), which is where most of its
gain comes from (see the README's results: without augmentation this student alone reaches
88.7-89.0% after 10 epochs, and distillation moved it by -0.9 to +0.6 points there).
"""

from kdjax.config import base_config

STUDENT_HIDDEN = (128,)  # 784-128-10: ~0.1M parameters, ~24x smaller than the teacher


def get_config(model: str = "mlp"):
    c = base_config()
    c.seed = 0
    c.data.name = "fashion_mnist"
    c.model.name = model
    c.model.kwargs = {"hidden": STUDENT_HIDDEN} if model == "mlp" else {}
    c.data.crop_padding = 2
    c.data.flip = True
    c.train.steps = 2340  # 5 epochs
    c.train.batch_size = 128
    c.train.log_every_steps = 234
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.loss.name = "ce"
    c.eval.every_steps = 1170
    c.checkpoint.every_steps = 1170
    return c
